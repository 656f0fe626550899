"""The object store port: a handful of async methods over keys and bytes.

Archives (one file per church, month and table) and, later, MMS media live
behind it. Both adapters are built on obstore (storage/objects/stores.py says why);
the port keeps that choice out of every caller, so a test or a later backend
needs only these methods.
"""

from __future__ import annotations

from typing import Protocol


class ObjectStore(Protocol):
    """Whole objects under validated keys (storage/objects/keys.py).

    Every method raises InvalidObjectKey for a bad key before any I/O, and
    ObjectStoreError (storage/objects/errors.py) when the backend fails.
    """

    @property
    def url(self) -> str:
        """Where the objects are: ``file:///path`` or ``s3://bucket/prefix``."""
        ...

    async def put(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        """Store ``data`` under ``key``, replacing any object there. Atomic: a reader
        sees the old object or the new one, never a part; durable once it returns.
        ``content_type`` is kept where the backend keeps one (S3; file:// does not)."""
        ...

    async def get(self, key: str) -> bytes:
        """The whole object; ObjectNotFound when there is none."""
        ...

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` (inclusive) to ``end`` (exclusive); ObjectNotFound."""
        ...

    async def size(self, key: str) -> int:
        """The object's length in bytes; ObjectNotFound."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (S3's rule)."""
        ...

    async def list(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix`` (a plain string prefix, as S3 has it),
        sorted."""
        ...

    async def signed_url(self, key: str, expires_s: int) -> str:
        """A URL that fetches the object with a plain GET for ``expires_s`` seconds
        (1 to 604800, S3's bounds). SignedUrlNotSupported on file://, where the app
        serves the object itself. The object need not exist yet."""
        ...
