"""Opening the object store the settings name (KOINONIA_OBJECT_STORE_URL).

Both adapters use obstore: on the bench (bench/README.md "Object store") it
took 1.6-2.8x less CPU than aiobotocore per S3 put and get, and matched plain
threaded file I/O for puts on disk (file:// gets read the file directly: 2-3x
faster that way). One maintained library serves S3, GCS, Azure and
local files, with abi3 wheels for every common platform and no botocore pin.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from storage.objects.files import FileObjectStore
from storage.objects.port import ObjectStore
from storage.objects.s3 import S3ObjectStore
from storage.process.settings import (
    OBJECT_STORE_URL_HELP,
    ObjectStoreSettings,
    Settings,
    object_store_url,
)


def open_object_store(settings: Settings | ObjectStoreSettings) -> ObjectStore:
    """The store of ``settings`` (the whole Settings or its ``object_store``
    section). Opening does no I/O beyond creating the file:// folder: a wrong S3
    bucket or credentials show on the first operation."""
    if isinstance(settings, Settings):
        section = settings.object_store
        if not section.url:  # built by hand, not by from_env: the default folder
            url = object_store_url("", settings.data_dir)
            section = msgspec.structs.replace(section, url=url)
    else:
        section = settings
    if section.scheme == "file":
        return FileObjectStore(Path(section.path))
    if section.scheme == "s3":
        return S3ObjectStore(section)
    raise ValueError(f"KOINONIA_OBJECT_STORE_URL must be {OBJECT_STORE_URL_HELP}: {section.url!r}")
