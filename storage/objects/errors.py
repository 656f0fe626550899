"""What the object store raises.

::

    ObjectStoreError            any failure of the store (I/O, credentials, network)
    ├── ObjectNotFound          no object under that key
    ├── InvalidObjectKey        a key or prefix outside the allowed alphabet and shape
    └── SignedUrlNotSupported   the backend cannot sign URLs (file://)

Edges turn them into statuses (ObjectNotFound: 404); the core never does.
"""

from __future__ import annotations


class ObjectStoreError(Exception):
    """Base of every object store error."""


class ObjectNotFound(ObjectStoreError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no object at {key!r}")
        self.key = key


class InvalidObjectKey(ObjectStoreError, ValueError):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"invalid object key {key!r}: {reason}")
        self.key = key
        self.reason = reason


class SignedUrlNotSupported(ObjectStoreError):
    def __init__(self, backend: str) -> None:
        super().__init__(f"{backend} cannot sign URLs; serve the object through the app")
        self.backend = backend
