"""The file:// adapter: objects as files under one folder (the default, under
the data folder).

obstore writes each put to a staging file beside the target and renames it into
place, so a reader never sees half an object. It does not fsync; the archive
drops a month's partitions once its files read back, so a put here also syncs
the file and its folder before it returns: a power cut after the drop must not
take the only copy with it.

A whole-object get reads the file in a worker thread instead of through obstore:
obstore copies what it read into a Python ``bytes`` a second time, which made a
20 MB get about twice as slow (bench/README.md "Object store"). The key alphabet
(storage/objects/keys.py) needs no escaping, so ``<root>/<key>`` is the file
obstore wrote.

Signed URLs: not supported (SignedUrlNotSupported). A file:// store is reachable
only by the processes on this machine; whoever serves its objects to a browser
(MMS media, a later issue) streams them through the app, which checks access.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from obstore.store import LocalStore

from storage.objects.errors import ObjectNotFound, ObjectStoreError
from storage.objects.keys import validate_key
from storage.objects.obstore_adapter import ObstoreObjectStore


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_object(root: Path, key: str) -> None:
    file = root / key
    _fsync(file)
    # The rename lives in the folder's entry; sync it too (and every folder the put
    # created, up to the root: a new month's folder is as new as its file).
    folder = file.parent
    while True:
        _fsync(folder)
        if folder == root:
            break
        folder = folder.parent


class FileObjectStore(ObstoreObjectStore):
    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise ValueError(f"the object folder must be an absolute path, not {root}")
        # automatic_cleanup: deleting a folder's last object removes the empty folder.
        store = LocalStore(root, mkdir=True, automatic_cleanup=True)
        super().__init__(store, root.as_uri())
        self.root = root

    async def _after_put(self, key: str) -> None:
        await asyncio.to_thread(_sync_object, self.root, key)

    async def get(self, key: str) -> bytes:
        validate_key(key)
        try:
            return await asyncio.to_thread((self.root / key).read_bytes)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            # A folder is no object either (``archive/c1`` holds objects, is none).
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise ObjectStoreError(f"get {key!r} failed: {exc}") from exc
