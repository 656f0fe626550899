"""The s3:// adapter: any S3-compatible store (AWS, MinIO, R2, Ceph, moto).

Credentials, region and endpoint come from the settings (the standard AWS
variables, storage/process/settings.py ObjectStoreSettings). A plain http://
endpoint is allowed only because one was configured explicitly (a store on
loopback or a private network).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store

from storage.objects.errors import ObjectStoreError
from storage.objects.keys import validate_key
from storage.objects.obstore_adapter import ObstoreObjectStore
from storage.process.settings import ObjectStoreSettings

if TYPE_CHECKING:
    from obstore import Attributes
    from obstore.store import ClientConfig, RetryConfig, S3Config

MAX_RETRIES = 3
"""Failed requests (5xx, timeouts, resets) retried per operation, with backoff,
within the settings' timeout."""
CONNECT = timedelta(seconds=5)
"""Longest wait for a connection: a store that does not answer in 5 s is down."""
MAX_SIGNED_S = 7 * 24 * 3600
"""S3 refuses presigned URLs valid longer than seven days."""


class S3ObjectStore(ObstoreObjectStore):
    def __init__(self, settings: ObjectStoreSettings) -> None:
        config: S3Config = {}
        if settings.aws_access_key_id:
            config["access_key_id"] = settings.aws_access_key_id
            config["secret_access_key"] = settings.aws_secret_access_key
        if settings.aws_session_token:
            config["session_token"] = settings.aws_session_token
        if settings.aws_region:
            config["region"] = settings.aws_region
        limit = timedelta(seconds=settings.timeout_s)
        client: ClientConfig = {"timeout": limit, "connect_timeout": min(limit, CONNECT)}
        retry: RetryConfig = {"max_retries": MAX_RETRIES, "retry_timeout": limit}
        if settings.aws_endpoint_url:
            config["endpoint"] = settings.aws_endpoint_url
            client["allow_http"] = settings.aws_endpoint_url.startswith("http://")
        store = S3Store(
            settings.bucket,
            prefix=settings.prefix or None,
            config=config,
            client_options=client,
            retry_config=retry,
        )
        super().__init__(store, settings.url)
        self._s3 = store

    def _attributes(self, content_type: str | None) -> Attributes | None:
        return None if content_type is None else {"Content-Type": content_type}

    async def signed_url(self, key: str, expires_s: int) -> str:
        validate_key(key)
        if not 1 <= expires_s <= MAX_SIGNED_S:
            raise ValueError(
                f"expires_s must be 1 to {MAX_SIGNED_S} (S3's bounds), not {expires_s}"
            )
        try:
            return await obstore.sign_async(self._s3, "GET", key, timedelta(seconds=expires_s))
        except BaseError as exc:
            raise ObjectStoreError(f"signing {key!r} failed: {exc}") from exc
