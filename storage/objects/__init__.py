"""The object store: archives and (later) MMS media, on disk or on S3.

``open_object_store(settings)`` gives an ObjectStore (port.py); keys are checked
by keys.py; errors.py shows the exception tree. docs/operations.md "Object store"
describes the settings and the layout of keys.
"""

from storage.objects.errors import (
    InvalidObjectKey,
    ObjectNotFound,
    ObjectStoreError,
    SignedUrlNotSupported,
)
from storage.objects.port import ObjectStore
from storage.objects.stores import open_object_store

__all__ = [
    "InvalidObjectKey",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStoreError",
    "SignedUrlNotSupported",
    "open_object_store",
]
