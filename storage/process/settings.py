"""One settings object, read from the environment once at start-up and passed down.

Every field maps to an environment variable named in its section (``KOINONIA_*``
unless the name is a well-known one such as ``DATABASE_URL``). The README lists
them all; ``Settings.describe()`` prints them with their current values.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote as url_unquote
from urllib.parse import urlsplit

import msgspec


class DatabaseSettings(msgspec.Struct, frozen=True, kw_only=True):
    url: str = ""
    """DATABASE_URL; empty means: start the embedded Postgres under the data folder."""
    session_url: str = ""
    """DATABASE_SESSION_URL: a direct connection to the primary (not through PgBouncer)
    for what needs a session of its own: ``koinonia migrate`` uses it when set. Empty:
    DATABASE_URL serves those too (fine without a transaction-mode pooler)."""
    prepared_statements: bool = True
    """KOINONIA_DB_PREPARED_STATEMENTS: ``off`` behind PgBouncer in transaction mode,
    where the next transaction may run on another server connection that never saw
    the statement (psycopg's ``prepare_threshold=None``)."""
    pool_min: int = 2
    """KOINONIA_DB_POOL_MIN"""
    pool_max: int = 10
    """KOINONIA_DB_POOL_MAX"""
    timeout_s: float = 3.0
    """KOINONIA_DB_TIMEOUT_S: longest wait for a pooled connection, and to connect; a
    request that cannot have one in time answers 503 instead of queueing."""
    replica_urls: tuple[str, ...] = ()
    """DATABASE_REPLICA_URLS: comma-separated streaming replicas of the primary; reads
    their repository marks stale-tolerant go to them (storage/pg/replicas.py). Give
    every web process the same list."""
    replica_max_lag_ms: int = 1000
    """KOINONIA_REPLICA_MAX_LAG_MS: a replica further behind than this is skipped."""
    replica_poll_s: float = 0.25
    """KOINONIA_REPLICA_POLL_S: how often each process that reads from replicas
    measures their lag and reachability."""


class RedisSettings(msgspec.Struct, frozen=True, kw_only=True):
    url: str = ""
    """REDIS_URL; empty means: start the embedded Redis (Valkey) under the data folder."""
    cluster_nodes: tuple[str, ...] = ()
    """REDIS_CLUSTER_NODES: comma-separated seed nodes of a Redis Cluster, each
    ``host:port`` or a ``redis://`` / ``rediss://`` URL (credentials and TLS are taken
    from the first); when set, the cluster client is used and REDIS_URL is ignored."""


class HttpSettings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    """KOINONIA_HTTP_HOST"""
    port: int = 8000
    """KOINONIA_HTTP_PORT"""
    public_url: str = ""
    """KOINONIA_PUBLIC_URL: the address the provider calls back; default http://host:port."""
    max_body_bytes: int = 1_048_576
    """KOINONIA_MAX_BODY_BYTES: larger request bodies get 413 payload_too_large."""
    allowed_origins: tuple[str, ...] = ()
    """KOINONIA_ALLOWED_ORIGINS: comma-separated origins allowed for cookie-authenticated
    WebSocket and CORS requests; the public URL is always allowed."""
    secure_cookies: bool = False
    """KOINONIA_SECURE_COOKIES: mark cookies Secure (set when served over TLS)."""
    session_ttl_s: int = 7 * 24 * 3600
    """KOINONIA_SESSION_TTL_S"""
    principal_cache_s: float = 5.0
    """KOINONIA_PRINCIPAL_CACHE_S: how long a web process keeps a principal it
    resolved (0: not at all). Revocations drop entries at once; this bounds what a
    revocation lost with the pub/sub connection could leave behind."""
    principal_cache_size: int = 10_000
    """KOINONIA_PRINCIPAL_CACHE_SIZE: principals kept per web process, oldest out first."""


class RealtimeSettings(msgspec.Struct, frozen=True, kw_only=True):
    max_connections: int = 20_000
    """KOINONIA_WS_MAX_CONNECTIONS: WebSocket connections one web process holds."""
    max_connections_per_church: int = 2_000
    """KOINONIA_WS_MAX_PER_CHURCH: per church and web process; more close with 4029."""
    presence_heartbeat_s: float = 15.0
    """KOINONIA_PRESENCE_HEARTBEAT_S: how often each web node rewrites its staff
    connections (who is online, who views what) in Redis."""
    presence_ttl_s: float = 40.0
    """KOINONIA_PRESENCE_TTL_S: how long a connection's entry outlives its node's last
    write; a node that dies drops out within TTL + heartbeat (60 s at most)."""


def presence_intervals(heartbeat_s: float, ttl_s: float) -> dict[str, float]:
    """The two presence intervals, checked: a dead node must drop out within 60 s
    (docs/protocol.md "The inbox"), and a live one must write before its entries
    expire."""
    if not 0 < heartbeat_s < ttl_s:
        raise ValueError(
            "KOINONIA_PRESENCE_HEARTBEAT_S must be above 0 and below KOINONIA_PRESENCE_TTL_S"
        )
    if ttl_s + heartbeat_s > 60:
        raise ValueError(
            "KOINONIA_PRESENCE_TTL_S + KOINONIA_PRESENCE_HEARTBEAT_S must be at most 60 s: "
            "a dead node's staff must go offline within a minute"
        )
    return {"presence_heartbeat_s": heartbeat_s, "presence_ttl_s": ttl_s}


class SecuritySettings(msgspec.Struct, frozen=True, kw_only=True):
    phone_key: bytes = b""
    """KOINONIA_PHONE_KEY: base64 of 32 bytes; AES-256-GCM key for phone numbers at rest."""
    lookup_key: bytes = b""
    """KOINONIA_LOOKUP_KEY: base64 of 32 bytes; HMAC-SHA256 key for phone lookup hashes."""
    password_time_cost: int = 3
    """KOINONIA_PASSWORD_TIME_COST: argon2id passes (RFC 9106's second profile: 3)."""
    password_memory_kib: int = 65_536
    """KOINONIA_PASSWORD_MEMORY_KIB: argon2id memory in KiB (64 MiB). The test suite
    lowers both so that hundreds of sign-ups take seconds, not minutes; a hash keeps
    its own parameters, so lowering or raising them never locks anyone out."""


class ProviderSettings(msgspec.Struct, frozen=True, kw_only=True):
    base_url: str = "http://127.0.0.1:8025"
    """KOINONIA_PROVIDER_URL: Telnyx API base (https://api.telnyx.com) or the simulator."""
    api_key: str = "dev-key"
    """KOINONIA_PROVIDER_API_KEY: Telnyx API key (Bearer)."""
    public_key: str = ""
    """KOINONIA_PROVIDER_PUBLIC_KEY: base64 Ed25519 public key that signs inbound webhooks."""
    webhook_tolerance_s: int = 300
    """KOINONIA_WEBHOOK_TOLERANCE_S"""
    timeout_s: float = 10.0
    """KOINONIA_PROVIDER_TIMEOUT_S"""
    number_pool_prefix: str = "+1555"
    """KOINONIA_NUMBER_POOL_PREFIX: development sending numbers are allocated from here."""


class DeliverySettings(msgspec.Struct, frozen=True, kw_only=True):
    shards: int = 8
    """KOINONIA_QUEUE_SHARDS: number of ready sets the churches with work are spread over."""
    batch_size: int = 100
    """KOINONIA_BATCH_SIZE: recipients per queue entry."""
    concurrency: int = 64
    """KOINONIA_WORKER_CONCURRENCY: provider calls in flight per worker."""
    max_attempts: int = 5
    """KOINONIA_MAX_ATTEMPTS"""
    retry_base_s: float = 2.0
    """KOINONIA_RETRY_BASE_S: first retry delay; doubles each attempt, with jitter."""
    claim_idle_ms: int = 60_000
    """KOINONIA_CLAIM_IDLE_MS: queue entries idle this long are taken over (XAUTOCLAIM)."""
    reconcile_after_s: int = 300
    """KOINONIA_RECONCILE_AFTER_S: recipients still queued/sending this long are re-enqueued."""
    receipt_timeout_s: float = 3600.0
    """KOINONIA_RECEIPT_TIMEOUT_S: a sent text with no final receipt this long is looked
    up at the provider (GET /v2/messages/{id}), and again every as long after."""
    receipt_window_s: float = 72 * 3600.0
    """KOINONIA_RECEIPT_WINDOW_S: after this long without a final status a recipient ends
    ``sent`` with error ``delivery_unconfirmed`` (final): no receipt will come."""
    scheduler_interval_s: float = 5.0
    """KOINONIA_SCHEDULER_INTERVAL_S"""
    church_quantum: int = 1
    """KOINONIA_QUEUE_QUANTUM: queue entries a worker takes from one church per turn;
    churches with work take turns, so a small church waits for about one turn."""
    rate_per_number: float = 0.0
    """KOINONIA_SEND_RATE_PER_NUMBER: texts per second per sending number (token
    bucket shared by every worker); 0 leaves the pace of a number to the provider."""
    rate_per_account: float = 1000.0
    """KOINONIA_SEND_RATE_PER_ACCOUNT: texts per second over the whole provider
    account (every number); 0 means no limit of ours."""
    mms_rate_per_account: float = 15.0
    """KOINONIA_MMS_RATE_PER_ACCOUNT: MMS (texts with media) per second over the whole
    provider account, on top of the texts' own limits (Telnyx's default is 15)."""
    media_link_ttl_s: int = 3600
    """KOINONIA_MEDIA_LINK_TTL_S: how long a media link given to the provider works."""
    rate_burst_s: float = 1.0
    """KOINONIA_SEND_BURST_S: a bucket holds this many seconds of its rate."""
    throttle_hold_s: float = 1.0
    """KOINONIA_THROTTLE_HOLD_S: a batch waits in place for tokens at most this long;
    a longer wait hands its recipients back to the church's delayed set."""
    circuit_failures: int = 10
    """KOINONIA_CIRCUIT_FAILURES: consecutive provider failures (5xx, timeouts,
    connection errors) that open the circuit: no sends until the cool-down ends."""
    circuit_cooldown_s: float = 5.0
    """KOINONIA_CIRCUIT_COOLDOWN_S: how long an open circuit waits before one probe."""


class SimulatorSettings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    """KOINONIA_SIM_HOST"""
    port: int = 8025
    """KOINONIA_SIM_PORT"""
    api_key: str = ""
    """KOINONIA_SIM_API_KEY: when set, the only Bearer key the simulator accepts."""
    signing_seed: str = ""
    """KOINONIA_SIM_SIGNING_SEED: base64 32-byte Ed25519 seed; generated when empty."""
    default_webhook_url: str = ""
    """KOINONIA_SIM_WEBHOOK_URL: where webhooks go when a send names no webhook_url."""
    state_file: str = ""
    """KOINONIA_SIM_STATE_FILE: where receipts still pending at shutdown (and the sent
    messages that ``GET /v2/messages/{id}`` reports) are kept until the next start;
    ``koinonia dev`` sets it in the data folder. Empty: they are logged as lost."""


class LimitSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Requests per minute. Plans from the customer's card; every figure is a setting."""

    plans: dict[str, int] = msgspec.field(
        default_factory=lambda: {"starter": 100, "growth": 300, "pro": 1000}
    )
    """KOINONIA_RATE_STARTER, KOINONIA_RATE_GROWTH, KOINONIA_RATE_PRO"""
    api_key: int = 600
    """KOINONIA_RATE_API_KEY: default per-key limit when a key sets none."""
    login_per_ip: int = 20
    """KOINONIA_RATE_LOGIN_IP"""
    login_per_account: int = 10
    """KOINONIA_RATE_LOGIN_ACCOUNT"""
    reset_per_ip: int = 10
    """KOINONIA_RATE_RESET_IP"""
    reset_per_account: int = 3
    """KOINONIA_RATE_RESET_ACCOUNT"""


class MailSettings(msgspec.Struct, frozen=True, kw_only=True):
    smtp_url: str = ""
    """KOINONIA_SMTP_URL: smtp://user:pass@host:port (smtps:// for TLS). Empty: mail
    goes to the development outbox in Postgres (``koinonia outbox`` lists it)."""
    sender: str = "Koinonia <no-reply@koinonia.local>"
    """KOINONIA_MAIL_FROM"""


class WebhookSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Outgoing integrator webhooks (Standard Webhooks), sent by the delivery worker."""

    allow_private_destinations: bool = False
    """KOINONIA_WEBHOOK_ALLOW_PRIVATE: let endpoints point at private, loopback or
    link-local addresses (``koinonia dev`` sets it; production leaves it off)."""
    timeout_s: float = 15.0
    """KOINONIA_WEBHOOK_TIMEOUT_S: one attempt, connect to last byte."""
    retry_schedule_s: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    """KOINONIA_WEBHOOK_RETRY_SCHEDULE: comma-separated delays (seconds) before each
    retry; one attempt plus one per delay (default: 8 attempts over ~27.6 hours)."""
    retry_scale: float = 1.0
    """KOINONIA_WEBHOOK_RETRY_SCALE: multiplies every retry delay (tests compress them)."""
    secret_overlap_s: int = 24 * 3600
    """KOINONIA_WEBHOOK_SECRET_OVERLAP_S: a rotated-out secret keeps signing this long."""
    failure_threshold: int = 100
    """KOINONIA_WEBHOOK_FAILURE_THRESHOLD: consecutive deliveries that used up every
    retry without a success in between disable the endpoint."""
    disable_after_s: int = 5 * 24 * 3600
    """KOINONIA_WEBHOOK_DISABLE_AFTER_S: an endpoint whose attempts have all failed
    for this long is disabled."""
    concurrency: int = 32
    """KOINONIA_WEBHOOK_CONCURRENCY: webhook requests in flight per worker."""
    per_endpoint_concurrency: int = 8
    """KOINONIA_WEBHOOK_PER_ENDPOINT: of those, at most this many to one endpoint."""
    poll_s: float = 0.25
    """KOINONIA_WEBHOOK_POLL_S: how often an idle worker looks for due deliveries."""
    retention_days: int = 30
    """KOINONIA_WEBHOOK_RETENTION_DAYS: events, deliveries and attempts kept this long."""

    @property
    def max_attempts(self) -> int:
        return len(self.retry_schedule_s) + 1

    def retry_delay_s(self, attempt: int) -> float | None:
        """The wait after failed attempt number ``attempt`` (1-based); None after the last."""
        if attempt > len(self.retry_schedule_s):
            return None
        return self.retry_schedule_s[attempt - 1] * self.retry_scale


OBJECT_STORE_URL_HELP = "file:///absolute/path or s3://bucket/prefix"

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
"""S3's bucket naming rules (lowercase letters, digits, dots, hyphens; 3-63)."""
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")
"""A segment of an s3:// prefix, as of any object key (storage/objects/keys.py)."""


class ObjectStoreSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where archives and media live (docs/operations.md "Object store")."""

    url: str = ""
    """KOINONIA_OBJECT_STORE_URL: ``file:///absolute/path`` (default: ``objects/``
    under the data folder, made absolute at start-up) or ``s3://bucket/prefix``."""
    aws_access_key_id: str = ""
    """AWS_ACCESS_KEY_ID (s3:// only); empty: obstore's own lookup (instance role)."""
    aws_secret_access_key: str = ""
    """AWS_SECRET_ACCESS_KEY"""
    aws_session_token: str = ""
    """AWS_SESSION_TOKEN: for temporary credentials."""
    aws_region: str = ""
    """AWS_DEFAULT_REGION (or AWS_REGION); empty: us-east-1."""
    aws_endpoint_url: str = ""
    """AWS_ENDPOINT_URL: any S3-compatible store (MinIO, R2, ...); http:// allowed."""
    timeout_s: float = 30.0
    """KOINONIA_OBJECT_STORE_TIMEOUT_S (s3://): one request's longest time, and the
    longest an operation keeps retrying failed ones (at most 3 retries; obstore's
    defaults, 10 retries for up to 3 minutes, are too long behind an HTTP request)."""

    @property
    def scheme(self) -> str:
        """``file`` or ``s3``."""
        return self.url.partition("://")[0]

    @property
    def path(self) -> str:
        """file://: the absolute folder."""
        return url_unquote(self.url.partition("://")[2])

    @property
    def bucket(self) -> str:
        """s3://: the bucket."""
        return self.url.partition("://")[2].partition("/")[0]

    @property
    def prefix(self) -> str:
        """s3://: the key prefix every object goes under (no slashes around it)."""
        return self.url.partition("://")[2].partition("/")[2].strip("/")


def object_store_url(raw: str, data_dir: Path) -> str:
    """KOINONIA_OBJECT_STORE_URL checked and normalised: ``file:///abs/path`` or
    ``s3://bucket`` / ``s3://bucket/prefix``. ValueError saying what is wrong."""
    variable = "KOINONIA_OBJECT_STORE_URL"
    text = raw.strip()
    if not text:
        return (data_dir.resolve() / "objects").as_uri()
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise ValueError(
            f"{variable} takes no query or fragment ({OBJECT_STORE_URL_HELP}): {raw!r}"
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"{variable}: file:// takes no host (three slashes: file:///path): {raw!r}"
            )
        folder = url_unquote(parts.path)
        if not folder.startswith("/") or ".." in folder.split("/"):
            raise ValueError(f"{variable}: the folder must be an absolute path without ..: {raw!r}")
        return Path(folder).as_uri()
    if parts.scheme == "s3":
        if parts.username or parts.password or parts.port is not None:
            raise ValueError(
                f"{variable}: s3:// takes a bucket, not credentials or a port (use the AWS_*"
                f" variables, AWS_ENDPOINT_URL for another server): {raw!r}"
            )
        bucket = parts.hostname or ""
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ValueError(f"{variable}: {bucket!r} is not a valid S3 bucket name: {raw!r}")
        prefix = parts.path.strip("/")
        if prefix and not all(_PREFIX_SEGMENT.fullmatch(p) for p in prefix.split("/")):
            raise ValueError(
                f"{variable}: the prefix {prefix!r} must be /-separated segments of letters,"
                f" digits, . _ = - (each starting alphanumeric): {raw!r}"
            )
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    raise ValueError(f"{variable} must be {OBJECT_STORE_URL_HELP}, not {raw!r}")


def endpoint_url(raw: str) -> str:
    """AWS_ENDPOINT_URL checked: empty, or an http(s) URL with a host."""
    text = raw.strip()
    if not text:
        return ""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"AWS_ENDPOINT_URL must be an http:// or https:// URL, not {raw!r}")
    return text.rstrip("/")


METRICS_PROCESSES = ("web", "worker", "scheduler")
"""The process types that serve ``/metrics`` (the simulator serves none)."""


class ArchiveSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Moving old months to the object store (docs/operations.md "Archive")."""

    after_months: int = 24
    """KOINONIA_ARCHIVE_AFTER_MONTHS: months kept in the database; 0 turns off the
    scheduler's daily run (``koinonia archive`` then defaults to 24). 1 and below
    (except 0) are refused: the current and the previous month are never archived."""
    hour_utc: int = 3
    """KOINONIA_ARCHIVE_HOUR_UTC: the hour (0-23, UTC) of the scheduler's daily run."""
    cache_mb: int = 64
    """KOINONIA_ARCHIVE_CACHE_MB: recently read archive files kept in each web
    process, least recently used dropped first."""

    @property
    def months_kept(self) -> int:
        """What ``koinonia archive`` keeps by default: the setting, or 24 when 0."""
        return self.after_months or 24


def archive_after_months(raw: str) -> int:
    variable = "KOINONIA_ARCHIVE_AFTER_MONTHS"
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{variable} must be a whole number of months, not {raw!r}") from None
    if value != 0 and value < 2:
        raise ValueError(
            f"{variable} must be 2 or more (the current and the previous month are never "
            f"archived), or 0 to turn off the daily run; not {raw!r}"
        )
    return value


def archive_hour(raw: str) -> int:
    if not raw.strip().isdigit() or not 0 <= int(raw) <= 23:
        raise ValueError(f"KOINONIA_ARCHIVE_HOUR_UTC must be an hour from 0 to 23, not {raw!r}")
    return int(raw)


class MetricsSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Prometheus ``/metrics``, one port per process type (docs/operations.md "Metrics")."""

    host: str = "127.0.0.1"
    """KOINONIA_METRICS_HOST"""
    web_port: str = "9180"
    """KOINONIA_WEB_METRICS_PORT: a port, ``0`` (any free one, logged and recorded), or
    ``off`` (no server and no instrumentation in that process)."""
    worker_port: str = "9181"
    """KOINONIA_WORKER_METRICS_PORT"""
    scheduler_port: str = "9182"
    """KOINONIA_SCHEDULER_METRICS_PORT"""
    token: str = ""
    """KOINONIA_METRICS_TOKEN: when set, ``/metrics`` needs ``Authorization: Bearer
    <token>``, and the token also opens ``/health/detailed``."""
    sample_s: float = 5.0
    """KOINONIA_METRICS_SAMPLE_S: how often gauges of live state (pool, queue
    backlog, circuit, stores) are refreshed."""
    address_file: str = ""
    """KOINONIA_METRICS_ADDRESS_FILE: where a process writes the ``host:port`` its
    ``/metrics`` bound (``koinonia dev`` sets it, to learn the port ``0`` picked)."""

    def port(self, process: str) -> str:
        """The port setting of ``process`` (``web``, ``worker``, ``scheduler``); ``off``
        for any other process."""
        ports = {
            "web": self.web_port,
            "worker": self.worker_port,
            "scheduler": self.scheduler_port,
        }
        return ports.get(process, "off")


def metrics_port_variable(process: str) -> str:
    """The environment variable of ``process``'s metrics port."""
    return f"KOINONIA_{process.upper()}_METRICS_PORT"


def metrics_port(value: str, variable: str) -> str:
    """A metrics port setting as kept: ``off``, or a port number 0-65535 as text."""
    text = value.strip().lower()
    if text == "off":
        return text
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"{variable} must be a port number (0: any free port) or off")
    return str(int(text))


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: Path = Path(".koinonia")
    """KOINONIA_DATA_DIR: embedded Postgres/Redis and development keys live here."""
    environment: str = "production"
    """KOINONIA_ENV: production | development | test."""
    log_level: str = "INFO"
    """KOINONIA_LOG_LEVEL"""
    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    http: HttpSettings = HttpSettings()
    realtime: RealtimeSettings = RealtimeSettings()
    security: SecuritySettings = SecuritySettings()
    provider: ProviderSettings = ProviderSettings()
    delivery: DeliverySettings = DeliverySettings()
    simulator: SimulatorSettings = SimulatorSettings()
    limits: LimitSettings = LimitSettings()
    mail: MailSettings = MailSettings()
    webhooks: WebhookSettings = WebhookSettings()
    metrics: MetricsSettings = MetricsSettings()
    object_store: ObjectStoreSettings = ObjectStoreSettings()
    """Read with the rest; ``url`` is never empty after from_env (the default is filled in)."""
    archive: ArchiveSettings = ArchiveSettings()

    @property
    def public_url(self) -> str:
        return self.http.public_url or f"http://{self.http.host}:{self.http.port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env

        def s(name: str, default: str) -> str:
            return e.get(name, default)

        def i(name: str, default: int) -> int:
            return int(e.get(name, default))

        def f(name: str, default: float) -> float:
            return float(e.get(name, default))

        def b(name: str, default: bool) -> bool:
            raw = e.get(name)
            return default if raw is None else raw.strip().lower() in {"1", "true", "yes", "on"}

        def key(name: str) -> bytes:
            raw = e.get(name, "")
            if not raw:
                return b""
            value = base64.b64decode(raw)
            if len(value) != 32:
                raise ValueError(f"{name} must be base64 of exactly 32 bytes")
            return value

        def port(process: str, default: str) -> str:
            variable = metrics_port_variable(process)
            return metrics_port(s(variable, default), variable)

        origins = tuple(
            o.strip() for o in s("KOINONIA_ALLOWED_ORIGINS", "").split(",") if o.strip()
        )
        data_dir = Path(s("KOINONIA_DATA_DIR", ".koinonia"))
        return cls(
            data_dir=data_dir,
            environment=s("KOINONIA_ENV", "production"),
            log_level=s("KOINONIA_LOG_LEVEL", "INFO"),
            database=DatabaseSettings(
                url=s("DATABASE_URL", ""),
                session_url=s("DATABASE_SESSION_URL", ""),
                prepared_statements=b("KOINONIA_DB_PREPARED_STATEMENTS", True),
                pool_min=i("KOINONIA_DB_POOL_MIN", 2),
                pool_max=i("KOINONIA_DB_POOL_MAX", 10),
                timeout_s=f("KOINONIA_DB_TIMEOUT_S", 3.0),
                replica_urls=tuple(
                    u.strip() for u in s("DATABASE_REPLICA_URLS", "").split(",") if u.strip()
                ),
                replica_max_lag_ms=i("KOINONIA_REPLICA_MAX_LAG_MS", 1000),
                replica_poll_s=f("KOINONIA_REPLICA_POLL_S", 0.25),
            ),
            redis=RedisSettings(
                url=s("REDIS_URL", ""),
                cluster_nodes=tuple(
                    n.strip() for n in s("REDIS_CLUSTER_NODES", "").split(",") if n.strip()
                ),
            ),
            http=HttpSettings(
                host=s("KOINONIA_HTTP_HOST", "127.0.0.1"),
                port=i("KOINONIA_HTTP_PORT", 8000),
                public_url=s("KOINONIA_PUBLIC_URL", ""),
                max_body_bytes=i("KOINONIA_MAX_BODY_BYTES", 1_048_576),
                allowed_origins=origins,
                secure_cookies=b("KOINONIA_SECURE_COOKIES", False),
                session_ttl_s=i("KOINONIA_SESSION_TTL_S", 7 * 24 * 3600),
                principal_cache_s=f("KOINONIA_PRINCIPAL_CACHE_S", 5.0),
                principal_cache_size=i("KOINONIA_PRINCIPAL_CACHE_SIZE", 10_000),
            ),
            realtime=RealtimeSettings(
                max_connections=i("KOINONIA_WS_MAX_CONNECTIONS", 20_000),
                max_connections_per_church=i("KOINONIA_WS_MAX_PER_CHURCH", 2_000),
                **presence_intervals(
                    f("KOINONIA_PRESENCE_HEARTBEAT_S", 15.0), f("KOINONIA_PRESENCE_TTL_S", 40.0)
                ),
            ),
            security=SecuritySettings(
                phone_key=key("KOINONIA_PHONE_KEY"),
                lookup_key=key("KOINONIA_LOOKUP_KEY"),
                password_time_cost=i("KOINONIA_PASSWORD_TIME_COST", 3),
                password_memory_kib=i("KOINONIA_PASSWORD_MEMORY_KIB", 65_536),
            ),
            provider=ProviderSettings(
                base_url=s("KOINONIA_PROVIDER_URL", "http://127.0.0.1:8025"),
                api_key=s("KOINONIA_PROVIDER_API_KEY", "dev-key"),
                public_key=s("KOINONIA_PROVIDER_PUBLIC_KEY", ""),
                webhook_tolerance_s=i("KOINONIA_WEBHOOK_TOLERANCE_S", 300),
                timeout_s=f("KOINONIA_PROVIDER_TIMEOUT_S", 10.0),
                number_pool_prefix=s("KOINONIA_NUMBER_POOL_PREFIX", "+1555"),
            ),
            delivery=DeliverySettings(
                shards=i("KOINONIA_QUEUE_SHARDS", 8),
                batch_size=i("KOINONIA_BATCH_SIZE", 100),
                concurrency=i("KOINONIA_WORKER_CONCURRENCY", 64),
                max_attempts=i("KOINONIA_MAX_ATTEMPTS", 5),
                retry_base_s=f("KOINONIA_RETRY_BASE_S", 2.0),
                claim_idle_ms=i("KOINONIA_CLAIM_IDLE_MS", 60_000),
                reconcile_after_s=i("KOINONIA_RECONCILE_AFTER_S", 300),
                receipt_timeout_s=f("KOINONIA_RECEIPT_TIMEOUT_S", 3600.0),
                receipt_window_s=f("KOINONIA_RECEIPT_WINDOW_S", 72 * 3600.0),
                scheduler_interval_s=f("KOINONIA_SCHEDULER_INTERVAL_S", 5.0),
                church_quantum=i("KOINONIA_QUEUE_QUANTUM", 1),
                rate_per_number=f("KOINONIA_SEND_RATE_PER_NUMBER", 0.0),
                rate_per_account=f("KOINONIA_SEND_RATE_PER_ACCOUNT", 1000.0),
                mms_rate_per_account=f("KOINONIA_MMS_RATE_PER_ACCOUNT", 15.0),
                media_link_ttl_s=i("KOINONIA_MEDIA_LINK_TTL_S", 3600),
                rate_burst_s=f("KOINONIA_SEND_BURST_S", 1.0),
                throttle_hold_s=f("KOINONIA_THROTTLE_HOLD_S", 1.0),
                circuit_failures=i("KOINONIA_CIRCUIT_FAILURES", 10),
                circuit_cooldown_s=f("KOINONIA_CIRCUIT_COOLDOWN_S", 5.0),
            ),
            simulator=SimulatorSettings(
                host=s("KOINONIA_SIM_HOST", "127.0.0.1"),
                port=i("KOINONIA_SIM_PORT", 8025),
                api_key=s("KOINONIA_SIM_API_KEY", ""),
                signing_seed=s("KOINONIA_SIM_SIGNING_SEED", ""),
                default_webhook_url=s("KOINONIA_SIM_WEBHOOK_URL", ""),
                state_file=s("KOINONIA_SIM_STATE_FILE", ""),
            ),
            limits=LimitSettings(
                plans={
                    "starter": i("KOINONIA_RATE_STARTER", 100),
                    "growth": i("KOINONIA_RATE_GROWTH", 300),
                    "pro": i("KOINONIA_RATE_PRO", 1000),
                },
                api_key=i("KOINONIA_RATE_API_KEY", 600),
                login_per_ip=i("KOINONIA_RATE_LOGIN_IP", 20),
                login_per_account=i("KOINONIA_RATE_LOGIN_ACCOUNT", 10),
                reset_per_ip=i("KOINONIA_RATE_RESET_IP", 10),
                reset_per_account=i("KOINONIA_RATE_RESET_ACCOUNT", 3),
            ),
            mail=MailSettings(
                smtp_url=s("KOINONIA_SMTP_URL", ""),
                sender=s("KOINONIA_MAIL_FROM", "Koinonia <no-reply@koinonia.local>"),
            ),
            webhooks=WebhookSettings(
                allow_private_destinations=b("KOINONIA_WEBHOOK_ALLOW_PRIVATE", False),
                timeout_s=f("KOINONIA_WEBHOOK_TIMEOUT_S", 15.0),
                retry_schedule_s=tuple(
                    float(d)
                    for d in s(
                        "KOINONIA_WEBHOOK_RETRY_SCHEDULE", "5,300,1800,7200,18000,36000,36000"
                    ).split(",")
                    if d.strip()
                ),
                retry_scale=f("KOINONIA_WEBHOOK_RETRY_SCALE", 1.0),
                secret_overlap_s=i("KOINONIA_WEBHOOK_SECRET_OVERLAP_S", 24 * 3600),
                failure_threshold=i("KOINONIA_WEBHOOK_FAILURE_THRESHOLD", 100),
                disable_after_s=i("KOINONIA_WEBHOOK_DISABLE_AFTER_S", 5 * 24 * 3600),
                concurrency=i("KOINONIA_WEBHOOK_CONCURRENCY", 32),
                per_endpoint_concurrency=i("KOINONIA_WEBHOOK_PER_ENDPOINT", 8),
                poll_s=f("KOINONIA_WEBHOOK_POLL_S", 0.25),
                retention_days=i("KOINONIA_WEBHOOK_RETENTION_DAYS", 30),
            ),
            metrics=MetricsSettings(
                host=s("KOINONIA_METRICS_HOST", "127.0.0.1"),
                web_port=port("web", "9180"),
                worker_port=port("worker", "9181"),
                scheduler_port=port("scheduler", "9182"),
                token=s("KOINONIA_METRICS_TOKEN", ""),
                sample_s=f("KOINONIA_METRICS_SAMPLE_S", 5.0),
                address_file=s("KOINONIA_METRICS_ADDRESS_FILE", ""),
            ),
            object_store=ObjectStoreSettings(
                url=object_store_url(s("KOINONIA_OBJECT_STORE_URL", ""), data_dir),
                aws_access_key_id=s("AWS_ACCESS_KEY_ID", ""),
                aws_secret_access_key=s("AWS_SECRET_ACCESS_KEY", ""),
                aws_session_token=s("AWS_SESSION_TOKEN", ""),
                aws_region=s("AWS_DEFAULT_REGION", "") or s("AWS_REGION", ""),
                aws_endpoint_url=endpoint_url(s("AWS_ENDPOINT_URL", "")),
                timeout_s=f("KOINONIA_OBJECT_STORE_TIMEOUT_S", 30.0),
            ),
            archive=ArchiveSettings(
                after_months=archive_after_months(s("KOINONIA_ARCHIVE_AFTER_MONTHS", "24")),
                hour_utc=archive_hour(s("KOINONIA_ARCHIVE_HOUR_UTC", "3")),
                cache_mb=i("KOINONIA_ARCHIVE_CACHE_MB", 64),
            ),
        )
