"""The port over an obstore store: what both adapters share.

obstore (Rust's ``object_store`` crate) does the I/O outside the GIL: a put is
one request (or, on disk, a staging file renamed into place), so both backends
give the port's atomic put without code of ours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import BaseError, InvalidPathError, NotFoundError

from storage.objects.errors import (
    InvalidObjectKey,
    ObjectNotFound,
    ObjectStoreError,
    SignedUrlNotSupported,
)
from storage.objects.keys import is_valid_key, validate_key, validate_prefix

if TYPE_CHECKING:
    from obstore import Attributes
    from obstore.store import LocalStore, S3Store

LIST_CHUNK = 1000
"""Keys per listing page (S3's largest page)."""


@contextlib.contextmanager
def _translated(operation: str, key: str, *, writing: bool = False) -> Iterator[None]:
    """obstore's errors as the port's (storage/objects/errors.py)."""
    try:
        yield
    except (NotFoundError, FileNotFoundError) as exc:
        # obstore raises the built-in FileNotFoundError for a missing object on
        # every backend, its own NotFoundError in some versions. A write that finds
        # nothing means the bucket is missing: the store is broken, not the key.
        if writing:
            raise ObjectStoreError(f"{operation} {key!r} failed: {exc}") from exc
        raise ObjectNotFound(key) from None
    except InvalidPathError as exc:
        raise InvalidObjectKey(key, str(exc)) from exc
    except (BaseError, OSError) as exc:
        raise ObjectStoreError(f"{operation} {key!r} failed: {exc}") from exc


class ObstoreObjectStore:
    """ObjectStore (storage/objects/port.py) over an injected obstore store; the
    file and S3 adapters add what differs (durability, content types, signing)."""

    def __init__(self, store: LocalStore | S3Store, url: str) -> None:
        self._store = store
        """The obstore store; its prefix (folder or key prefix) is already applied."""
        self._url = url

    @property
    def url(self) -> str:
        return self._url

    def _attributes(self, content_type: str | None) -> Attributes | None:
        return None

    async def _after_put(self, key: str) -> None:
        return None

    async def put(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        validate_key(key)
        with _translated("put", key, writing=True):
            # One request whatever the size: a multipart upload killed midway leaves
            # invisible, billed parts behind, and the data is in memory already.
            await obstore.put_async(
                self._store,
                key,
                data,
                attributes=self._attributes(content_type),
                use_multipart=False,
            )
        await self._after_put(key)

    async def get(self, key: str) -> bytes:
        validate_key(key)
        with _translated("get", key):
            result = await obstore.get_async(self._store, key)
            return bytes(await result.bytes_async())

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        validate_key(key)
        if not 0 <= start <= end:
            raise ValueError(f"range {start}..{end} is not 0 <= start <= end")
        if start == end:
            await self.size(key)  # ObjectNotFound all the same
            return b""
        with _translated("get_range", key):
            return bytes(await obstore.get_range_async(self._store, key, start=start, end=end))

    async def size(self, key: str) -> int:
        validate_key(key)
        with _translated("size", key):
            meta = await obstore.head_async(self._store, key)
        return meta["size"]

    async def exists(self, key: str) -> bool:
        try:
            await self.size(key)
        except ObjectNotFound:
            return False
        return True

    async def delete(self, key: str) -> None:
        validate_key(key)
        with contextlib.suppress(ObjectNotFound), _translated("delete", key):
            await obstore.delete_async(self._store, key)

    async def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        # obstore lists whole path segments (``a/b`` matches ``a/b/x``, not ``a/bc``);
        # the port promises S3's string prefix, so list the folder and filter.
        folder = prefix.rpartition("/")[0] or None
        keys: list[str] = []
        with _translated("list", prefix):
            async for page in obstore.list(self._store, folder, chunk_size=LIST_CHUNK):
                # Only what a put could have written: not a stray file in the folder,
                # nor the staging file a killed put leaves (obstore skips ``name#N``).
                keys.extend(
                    m["path"]
                    for m in page
                    if m["path"].startswith(prefix) and is_valid_key(m["path"])
                )
        keys.sort()
        return keys

    async def signed_url(self, key: str, expires_s: int) -> str:
        validate_key(key)
        raise SignedUrlNotSupported(self._url.partition(":")[0] + "://")
