"""The ``koinonia`` command: one subcommand per process type, plus ``dev`` and ``migrate``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from storage.process.settings import Settings

if TYPE_CHECKING:
    from storage.process.metrics import Metrics, MetricsServer


def _settings_for(process: str, metrics_port: str | None) -> Settings:
    """The settings of a serving process, ``--metrics-port`` applied."""
    from storage.process.metrics import with_metrics_port

    try:
        return with_metrics_port(Settings.from_env(), process, metrics_port)
    except ValueError as exc:
        sys.exit(f"koinonia: {exc}")


def _serve_metrics(
    settings: Settings, process: str, metrics: Metrics | None
) -> MetricsServer | None:
    """Start the process's ``/metrics`` (none when its port is ``off``); a port in use
    ends the start-up with a message naming its variable."""
    from storage.process.metrics import MetricsPortInUse, serve_metrics

    if metrics is None:
        return None
    try:
        return serve_metrics(settings, process, metrics.registry)
    except MetricsPortInUse as exc:
        sys.exit(f"koinonia: {exc}")


def _require_keys(settings: Settings) -> None:
    if not settings.security.phone_key or not settings.security.lookup_key:
        sys.exit(
            "koinonia: KOINONIA_PHONE_KEY and KOINONIA_LOOKUP_KEY are required "
            "(base64 of 32 random bytes each; `koinonia dev` makes its own)"
        )
    if not settings.database.url or not (settings.redis.url or settings.redis.cluster_nodes):
        sys.exit(
            "koinonia: DATABASE_URL and REDIS_URL (or REDIS_CLUSTER_NODES) are required "
            "(or use `koinonia dev`)"
        )


# Per-message deflate off: per-connection zlib state was the largest per-delivery
# cost and tripled memory per idle connection (measured by the realtime work).
# Pings every 25 s match the heartbeat the welcome frame announces. The WebSocket
# protocol is uvicorn's wsproto one, leaner per idle connection (realtime/protocol.py;
# figures in bench/README.md "connections").
_UVICORN_OPTIONS: dict[str, Any] = {
    "log_config": None,
    "access_log": False,
    "ws": "realtime.protocol:LeanWSProtocol",
    "ws_per_message_deflate": False,
    "ws_ping_interval": 25.0,
    "ws_ping_timeout": 20.0,
    "ws_max_size": 65_536,
    "lifespan": "on",
    "timeout_graceful_shutdown": 10,
}


DRAIN_TIMEOUT_S = 5.0
"""How long WebSocket clients get to close after the server's 1001."""


def cmd_web(args: argparse.Namespace) -> None:
    import uvicorn

    from storage.process.metrics import Metrics

    settings = _settings_for("web", args.metrics_port)
    _require_keys(settings)
    address: dict[str, Any] = {"host": settings.http.host, "port": settings.http.port}
    if args.workers > 1:
        _web_workers(settings, args.workers, address)
        return
    from deploy.app import create_app
    from realtime.websocket import Sessions
    from storage.process.logs import configure_logging

    configure_logging(settings.log_level, process="web")
    _setup_tracing("web", settings)
    metrics = Metrics.for_process(settings, "web")
    server = _serve_metrics(settings, "web", metrics)
    app = create_app(settings, metrics=metrics)

    class DrainingServer(uvicorn.Server):
        """Closes WebSockets with 1001 (docs/protocol.md: server draining) before uvicorn's
        own shutdown, which would close them with 1012. With ``--workers N``
        uvicorn makes its servers itself, and they close with 1012."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            sessions: Sessions | None = getattr(app.state, "sessions", None)
            if sessions is not None and len(sessions):
                await sessions.drain(DRAIN_TIMEOUT_S)
            await super().shutdown(sockets)

    try:
        DrainingServer(uvicorn.Config(app, **address, **_UVICORN_OPTIONS)).run()
    finally:
        if server is not None:
            server.stop()


def _web_workers(settings: Settings, workers: int, address: dict[str, Any]) -> None:
    """``koinonia web --workers N``: uvicorn's supervisor and N workers. The workers
    keep their metrics in a multiprocess directory made for this run, and this process
    serves them all on the one port (storage/process/metrics.py)."""
    import uvicorn

    from storage.process.logs import configure_logging
    from storage.process.metrics import (
        MetricsPortInUse,
        MultiprocessDir,
        multiprocess_registry,
        serve_metrics,
    )
    from storage.process.settings import metrics_port_variable

    # The workers read their settings from the environment: an override goes there.
    os.environ[metrics_port_variable("web")] = settings.metrics.web_port
    shared: MultiprocessDir | None = None
    server: MetricsServer | None = None
    try:
        if settings.metrics.web_port != "off":
            configure_logging(settings.log_level, process="web")
            shared = MultiprocessDir()
            try:
                server = serve_metrics(settings, "web", multiprocess_registry(shared.path))
            except MetricsPortInUse as exc:
                sys.exit(f"koinonia: {exc}")
        uvicorn.run(
            "deploy.app:app_from_env",
            factory=True,
            workers=workers,
            **address,
            **_UVICORN_OPTIONS,
        )
    finally:
        if server is not None:
            server.stop()
        if shared is not None:
            shared.remove()


def _setup_tracing(process: str, settings: Settings) -> None:
    """OpenTelemetry spans when OTEL_EXPORTER_OTLP_ENDPOINT is set (storage/process/tracing.py);
    off, nothing of it is loaded."""
    from storage.process import tracing

    try:
        tracing.setup(process, environment=settings.environment)
    except ValueError as exc:
        sys.exit(f"koinonia: {exc}")


def _shutdown_tracing() -> None:
    from storage.process import tracing

    tracing.shutdown()


def _run(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run on uvloop (installed with uvicorn[standard]): the worker's event
    loop overhead per provider call is a visible share of its CPU."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


class _Runner(Protocol):
    def stop(self) -> None: ...

    async def run(self) -> None: ...


async def _run_until_signal(runner: _Runner) -> None:
    """Run until SIGTERM/SIGINT, which ask the runner to drain and stop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)
    await runner.run()


def cmd_worker(args: argparse.Namespace) -> None:
    from delivery.telnyx import TelnyxProvider
    from delivery.webhooks import Alongside, WebhookDispatcher
    from delivery.worker import Worker
    from storage.process.logs import configure_logging
    from storage.process.metrics import Metrics
    from storage.process.services import Services

    settings = _settings_for("worker", args.metrics_port)
    _require_keys(settings)
    configure_logging(settings.log_level, process="worker")
    _setup_tracing("worker", settings)
    metrics = Metrics.for_process(settings, "worker")
    server = _serve_metrics(settings, "worker", metrics)

    async def main() -> None:
        services = await Services.open(settings, metrics=metrics)
        provider = TelnyxProvider(
            settings.provider.base_url,
            settings.provider.api_key,
            timeout_s=settings.provider.timeout_s,
            concurrency=settings.delivery.concurrency,
            metrics=metrics,
        )
        try:
            await _run_until_signal(
                Alongside(Worker(services, provider, name=args.name), WebhookDispatcher(services))
            )
        finally:
            await provider.aclose()
            await services.close()
            _shutdown_tracing()

    try:
        _run(main())
    finally:
        if server is not None:
            server.stop()


def cmd_scheduler(args: argparse.Namespace) -> None:
    from delivery.scheduler import Scheduler
    from storage.process.logs import configure_logging
    from storage.process.metrics import Metrics
    from storage.process.services import Services

    settings = _settings_for("scheduler", args.metrics_port)
    _require_keys(settings)
    configure_logging(settings.log_level, process="scheduler")
    _setup_tracing("scheduler", settings)
    metrics = Metrics.for_process(settings, "scheduler")
    server = _serve_metrics(settings, "scheduler", metrics)

    async def main() -> None:
        services = await Services.open(settings, metrics=metrics)
        try:
            await _run_until_signal(Scheduler(services))
        finally:
            await services.close()
            _shutdown_tracing()

    try:
        _run(main())
    finally:
        if server is not None:
            server.stop()


def cmd_simulator(args: argparse.Namespace) -> None:
    import uvicorn

    from delivery.simulator import create_simulator_app
    from storage.process.logs import configure_logging

    settings = Settings.from_env()
    configure_logging(settings.log_level, process="simulator")
    uvicorn.run(
        create_simulator_app(settings.simulator),
        host=settings.simulator.host,
        port=settings.simulator.port,
        log_config=None,
        access_log=False,
    )


def _operator_settings(*, redis: bool) -> Settings:
    """Settings for an operator command: DATABASE_URL / REDIS_URL when set, else the
    stores of the `koinonia dev` running in the data folder (its ``stack.json``), else
    exit 2 with a message naming both ways (deploy/stack_file.py)."""
    from deploy.stack_file import NoStores, operator_settings

    try:
        settings = operator_settings(redis=redis)
    except NoStores as exc:
        print(f"koinonia: {exc}", file=sys.stderr)
        sys.exit(2)
    env_db = os.environ.get("DATABASE_URL")
    env_redis = os.environ.get("REDIS_URL") or os.environ.get("REDIS_CLUSTER_NODES")
    if not env_db or (redis and not env_redis):
        print(
            f"koinonia: using the stack of `koinonia dev` in {settings.data_dir}", file=sys.stderr
        )
    return settings


def cmd_migrate(args: argparse.Namespace) -> None:
    from storage.pg.database import migrate

    settings = _operator_settings(redis=False)
    # Direct when DATABASE_SESSION_URL is set; through PgBouncer works as well.
    applied = asyncio.run(migrate(settings.database.session_url or settings.database.url))
    print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")


def cmd_outbox(args: argparse.Namespace) -> None:
    """Print the development outbox: mail stored instead of sent (no KOINONIA_SMTP_URL)."""
    from psycopg import AsyncConnection

    from storage.pg.mail_outbox import list_outbox

    url = _operator_settings(redis=False).database.url

    async def main() -> None:
        async with await AsyncConnection.connect(url, autocommit=True) as conn:
            entries = await list_outbox(conn, limit=args.limit, to=args.to)
        if not entries:
            print("outbox: no mail")
        for entry in reversed(entries):
            print(f"--- {entry.created_at.isoformat(timespec='seconds')}  [{entry.status}]")
            print(f"To: {entry.recipient}")
            print(f"Subject: {entry.subject}")
            print()
            # Mail that went through SMTP keeps no body (it may hold a live token).
            print(entry.body if entry.body is not None else f"({entry.error or 'sent by SMTP'})")

    asyncio.run(main())


def cmd_import_members(args: argparse.Namespace) -> None:
    """Import a CSV file of members (as ``POST /v1/members/import`` does), streaming it,
    with progress on stderr every second and the summary as JSON on stdout. Exit
    status: 0 every row imported, 1 some rows failed, 2 nothing could be imported."""
    import uuid

    import msgspec

    from storage.domain.errors import InvalidInput
    from storage.pg.audit import record
    from storage.pg.churches import get_church
    from storage.pg.member_import import MemberImporter, Progress, import_file
    from storage.process.services import Services

    try:
        church_id = uuid.UUID(args.church_id)
    except ValueError:
        sys.exit("koinonia: --church-id must be a UUID")
    path = Path(args.file)
    if not path.is_file():
        sys.exit(f"koinonia: no such file: {path}")
    settings = _operator_settings(redis=True)
    _require_keys(settings)

    def show(p: Progress) -> None:
        rate = p.rows / p.elapsed_s if p.elapsed_s > 0 else 0.0
        percent = 100.0 * p.bytes_read / p.total_bytes if p.total_bytes else 100.0
        print(f"import: {p.rows} rows, {rate:.0f} rows/s, {percent:.1f}% of file", file=sys.stderr)

    async def main() -> int:
        services = await Services.open(settings, redis_connections=4)
        try:
            async with services.pool.connection() as conn:
                church = await get_church(conn, church_id)
            if church is None:
                print(f"koinonia: no church {church_id}", file=sys.stderr)
                return 2
            importer = MemberImporter(
                services.pool,
                services.vault,
                church_id,
                country=church.country,
                cache=services.cache,
            )
            try:
                summary = await import_file(importer, path, on_progress=show)
            except InvalidInput as exc:
                print(f"koinonia: {exc.field}: {exc.message}", file=sys.stderr)
                return 2
            counts = {k: getattr(summary, k) for k in ("processed", "created", "updated", "failed")}
            async with services.pool.connection() as conn:
                await record(
                    conn,
                    church_id,
                    actor_type="system",
                    actor_id=None,
                    action="member.import",
                    target_type="members",
                    details=counts,
                )
            print(msgspec.json.encode(summary).decode())
            return 1 if summary.failed else 0
        finally:
            await services.close()

    sys.exit(asyncio.run(main()))


def cmd_dead_letters(args: argparse.Namespace) -> None:
    """List dead letters (one JSON object per line, oldest first) or requeue them with a
    fresh attempt budget (storage/pg/dead_letters.py), with progress on stderr and the
    summary as JSON on stdout. Exit status: 0 done, 1 some entries were not found or
    too old to requeue, 2 nothing to do or bad arguments."""
    import uuid

    import msgspec

    from storage.domain.errors import Conflict, NotFound
    from storage.pg.audit import record
    from storage.pg.database import open_pool
    from storage.pg.dead_letters import dead_letters, requeue
    from storage.redis.connection import open_redis

    try:
        church_id = uuid.UUID(args.church_id) if args.church_id else None
    except ValueError:
        sys.exit("koinonia: --church-id must be a UUID")
    if args.action == "requeue" and bool(args.entry) == bool(args.all):
        sys.exit("koinonia: give one dead-letter id, or --all")
    settings = _operator_settings(redis=True)

    async def main() -> int:
        pool = await open_pool(settings.database, name="koinonia-cli")
        redis = open_redis(settings.redis, max_connections=4)
        try:
            if args.action == "list":
                count = 0
                async for letter in dead_letters(redis, church_id):
                    print(msgspec.json.encode(letter).decode(), flush=True)
                    count += 1
                print(f"dead letters: {count}", file=sys.stderr)
                return 0
            refs: list[uuid.UUID | str] = (
                [args.entry] if args.entry else [d.id async for d in dead_letters(redis, church_id)]
            )
            if not refs:
                print("dead letters: none to requeue", file=sys.stderr)
                return 2
            summary = {"entries": len(refs), "requeued_entries": 0, "recipients": 0}
            problems: list[dict[str, str]] = []
            shown = time.monotonic()
            for n, ref in enumerate(refs, 1):
                try:
                    done = await requeue(
                        pool,
                        redis,
                        ref,
                        church_id=church_id,
                        shards=settings.delivery.shards,
                        max_attempts=settings.delivery.max_attempts,
                    )
                except (NotFound, Conflict) as exc:
                    problems.append({"id": str(ref), "error": str(exc)})
                else:
                    summary["requeued_entries"] += 1
                    summary["recipients"] += done.requeued
                    async with pool.connection() as conn:
                        await record(
                            conn,
                            done.church_id,
                            actor_type="system",
                            actor_id=None,
                            action="dead_letter.requeue",
                            target_type="dead_letters",
                            target_id=str(done.id),
                            details={
                                "message_id": str(done.message_id),
                                "requeued": done.requeued,
                                "unchanged": done.unchanged,
                                "via": "cli",
                            },
                        )
                if time.monotonic() - shown >= 1.0 or n == len(refs):
                    shown = time.monotonic()
                    print(
                        f"requeue: {n}/{len(refs)} entries, {summary['recipients']} recipients",
                        file=sys.stderr,
                    )
            print(msgspec.json.encode({**summary, "problems": problems}).decode())
            return 1 if problems else 0
        finally:
            await pool.close()
            await redis.aclose()

    sys.exit(asyncio.run(main()))


def cmd_demo(args: argparse.Namespace) -> None:
    """Create a demo church with months of back-dated history (storage/pg/demo.py):
    progress on stderr, ``{"church_id", "email", "password", "api_key"}`` on stdout.
    Only Postgres: the church is new, so no cache in Redis can hold anything of it."""
    import secrets

    import msgspec
    from psycopg import AsyncConnection

    from api.sessions import hash_password
    from storage.domain.errors import Conflict
    from storage.domain.phones import PhoneVault
    from storage.pg.demo import MAX_MEMBERS, MAX_MONTHS, DemoProgress, create_demo

    if not 1 <= args.members <= MAX_MEMBERS:
        sys.exit(f"koinonia: --members must be 1 to {MAX_MEMBERS}")
    if not 1 <= args.months <= MAX_MONTHS:
        sys.exit(f"koinonia: --months must be 1 to {MAX_MONTHS}")
    settings = _operator_settings(redis=False)
    if not settings.security.phone_key or not settings.security.lookup_key:
        sys.exit(
            "koinonia: KOINONIA_PHONE_KEY and KOINONIA_LOOKUP_KEY are required "
            "(the ones the stack runs with; `koinonia dev` keeps its own beside stack.json)"
        )
    vault = PhoneVault(settings.security.phone_key, settings.security.lookup_key)
    email = f"demo-{secrets.token_hex(4)}@example.org"
    password = secrets.token_urlsafe(12)
    shown: dict[str, float] = {}

    def show(p: DemoProgress) -> None:
        # Every phase once, and then at most once a second.
        if p.elapsed_s - shown.get(p.phase, -1.0) < 1.0:
            return
        shown[p.phase] = p.elapsed_s
        rate = p.rows / p.elapsed_s if p.elapsed_s > 0 else 0.0
        print(
            f"demo: {p.phase}: {p.rows} rows, {rate:.0f} rows/s, {p.elapsed_s:.1f} s",
            file=sys.stderr,
        )

    async def main() -> dict[str, str]:
        password_hash = await hash_password(settings.security, password)
        # Direct when DATABASE_SESSION_URL is set (one long transaction and DDL for the
        # back-dated partitions); through PgBouncer works as well.
        url = settings.database.session_url or settings.database.url
        async with await AsyncConnection.connect(url, autocommit=True) as conn:
            demo = await create_demo(
                conn,
                vault,
                email=email,
                password_hash=password_hash,
                number_prefix=settings.provider.number_pool_prefix,
                members=args.members,
                months=args.months,
                seed=args.seed,
                on_progress=show,
            )
        print(
            f"demo: {demo.members} members, {demo.groups} groups, {demo.broadcasts} broadcasts "
            f"({demo.recipients} recipients), {demo.conversations} conversations "
            f"({demo.conversation_messages} texts) since {demo.since:%Y-%m-%d}",
            file=sys.stderr,
        )
        return {
            "church_id": str(demo.church_id),
            "email": email,
            "password": password,
            "api_key": demo.api_key,
        }

    try:
        created = asyncio.run(main())
    except Conflict as exc:
        sys.exit(f"koinonia: {exc}")
    print(msgspec.json.encode(created).decode())


def _archive_before(raw: str | None, today: date, months_kept: int) -> date:
    """``--before YYYY-MM`` checked, or the default: the current month minus the months
    kept. Exits 2 (as argparse does) for a bad or too recent month."""
    from storage.archive.archiver import add_months, latest_before, months_kept_before

    latest = latest_before(today)
    if raw is None:
        return months_kept_before(today, months_kept)
    try:
        year, month = raw.split("-")
        if len(year) != 4 or len(month) != 2:
            raise ValueError(raw)
        before = date(int(year), int(month), 1)
    except ValueError:
        print(
            f"koinonia: --before must be a month as YYYY-MM (e.g. {latest:%Y-%m}), not {raw!r}",
            file=sys.stderr,
        )
        sys.exit(2)
    if before > latest:
        print(
            f"koinonia: --before must be {latest:%Y-%m} or earlier: the current month and "
            f"the previous one ({add_months(latest, 1):%Y-%m}, {latest:%Y-%m}) are never "
            f"archived; {raw} would archive {add_months(before, -1):%Y-%m}",
            file=sys.stderr,
        )
        sys.exit(2)
    return before


def cmd_archive(args: argparse.Namespace) -> None:
    """Move whole months before ``--before`` to the object store (storage/archive/
    archiver.py): progress on stderr, the report as one JSON object on stdout."""
    from datetime import UTC, datetime

    import msgspec
    import psycopg

    from storage.archive.archiver import ArchiveProgress, Archiver
    from storage.archive.format import ArchiveError
    from storage.objects import ObjectStoreError, open_object_store

    today = datetime.now(UTC).date()
    # A bad --before is refused before anything is opened.
    before = _archive_before(args.before, today, 0) if args.before is not None else None
    settings = _operator_settings(redis=False)
    if before is None:
        before = _archive_before(None, today, settings.archive.months_kept)
    store = open_object_store(settings)
    shown: dict[str, float] = {}

    def show(p: ArchiveProgress) -> None:
        # Each phase at most once a second; every month's end always.
        if p.phase != "month" and p.elapsed_s - shown.get(p.phase, -1.0) < 1.0:
            return
        shown[p.phase] = p.elapsed_s
        what = {
            "file": f"writing {p.month}, church {p.church} of {p.churches}",
            "month": f"{p.month} archived ({p.churches} churches), partitions dropped",
            "compact": f"rewriting files without erased texts, church {p.church} of {p.churches}",
        }[p.phase]
        print(
            f"archive: {what}: {p.rows} rows, {p.bytes} bytes, {p.rows_per_s:.0f} rows/s, "
            f"{p.elapsed_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    def waiting() -> None:
        print("archive: waiting for another run", file=sys.stderr, flush=True)

    # Direct when DATABASE_SESSION_URL is set: the run's lock is a session's, and it
    # drops partitions.
    archiver = Archiver.for_url(settings.database.session_url or settings.database.url, store, show)
    print(f"archive: months before {before:%Y-%m} to {store.url}", file=sys.stderr, flush=True)
    try:
        report = asyncio.run(archiver.run(before, wait=True, on_wait=waiting))
    except (ArchiveError, ObjectStoreError) as exc:
        sys.exit(f"koinonia: archive: {exc}")
    except psycopg.Error as exc:
        sys.exit(f"koinonia: archive: database: {exc}")
    if report is None:  # only without waiting
        sys.exit("koinonia: archive: another run holds the lock")
    print(msgspec.json.encode(report).decode())


def cmd_dev(args: argparse.Namespace) -> None:
    from deploy.stack import Stack, say

    settings = Settings.from_env()
    # Development receivers usually listen on loopback (docs/protocol.md "Running it").
    os.environ.setdefault("KOINONIA_WEBHOOK_ALLOW_PRIVATE", "true")
    stack = Stack(
        Path(settings.data_dir).resolve(),
        http_port=settings.http.port,
        sim_port=settings.simulator.port,
        # Each process on its metrics port (KOINONIA_*_METRICS_PORT, 9180-9182).
        metrics_port=None,
    )
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start_stores()
        stack.start_processes()
        stack.wait_ready()
        print(f"Koinonia ready at http://127.0.0.1:{settings.http.port}", flush=True)
        while all(p.poll() is None for p in stack.processes.values()):
            time.sleep(0.5)
        failed = [n for n, p in stack.processes.items() if p.poll() is not None]
        say(f"process exited unexpectedly: {', '.join(failed)}; stopping")
    except KeyboardInterrupt:
        say("stopping")
    finally:
        # A second signal must not cut the clean-up short and orphan the children.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
        say("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="koinonia", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="run the whole stack (embedded stores unless URLs are set)")
    web = sub.add_parser("web", help="serve the REST API, realtime and inbound webhooks")
    web.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    worker = sub.add_parser("worker", help="run a delivery worker")
    worker.add_argument("--name", default=None, help="consumer name (default host-pid)")
    scheduler = sub.add_parser("scheduler", help="run the scheduler")
    for process, command in (("web", web), ("worker", worker), ("scheduler", scheduler)):
        command.add_argument(
            "--metrics-port",
            default=None,
            help="/metrics port: a number, 0 (any free one) or off "
            f"(default: KOINONIA_{process.upper()}_METRICS_PORT)",
        )
    sub.add_parser("simulator", help="run the Telnyx-compatible provider simulator")
    sub.add_parser("migrate", help="apply database migrations and create partitions")
    outbox = sub.add_parser("outbox", help="list mail in the development outbox (newest last)")
    outbox.add_argument("--limit", type=int, default=20, help="how many mails (default 20)")
    outbox.add_argument("--to", default=None, help="only mail to this address")
    imports = sub.add_parser("import-members", help="import members from a CSV file")
    imports.add_argument("--church-id", required=True, help="the church to import into")
    imports.add_argument("file", help="CSV file with a header row (phone, first_name, ...)")
    dead = sub.add_parser("dead-letters", help="list or requeue dead-lettered sends")
    dead_sub = dead.add_subparsers(dest="action", required=True)
    dead_list = dead_sub.add_parser("list", help="one JSON object per entry, oldest first")
    dead_list.add_argument("--church-id", default=None, help="only this church's entries")
    dead_requeue = dead_sub.add_parser("requeue", help="send again with a fresh attempt budget")
    dead_requeue.add_argument("entry", nargs="?", default=None, help="a dead-letter id")
    dead_requeue.add_argument("--all", action="store_true", help="every entry (of --church-id)")
    dead_requeue.add_argument("--church-id", default=None, help="only this church's entries")
    demo = sub.add_parser(
        "demo", help="create a demo church with back-dated history; prints its login as JSON"
    )
    demo.add_argument("--members", type=int, default=300, help="how many members (300)")
    demo.add_argument("--months", type=int, default=30, help="months of history (30)")
    demo.add_argument("--seed", type=int, default=1, help="seed of the content (1)")
    archive = sub.add_parser(
        "archive", help="move old months to the object store; prints a JSON summary"
    )
    archive.add_argument(
        "--before",
        default=None,
        metavar="YYYY-MM",
        help="archive every month before this one (default: the current month minus "
        "KOINONIA_ARCHIVE_AFTER_MONTHS, 24 when 0); the previous month at the latest",
    )
    args = parser.parse_args(argv)
    handlers = {
        "dev": cmd_dev,
        "web": cmd_web,
        "worker": cmd_worker,
        "scheduler": cmd_scheduler,
        "simulator": cmd_simulator,
        "migrate": cmd_migrate,
        "outbox": cmd_outbox,
        "import-members": cmd_import_members,
        "dead-letters": cmd_dead_letters,
        "demo": cmd_demo,
        "archive": cmd_archive,
    }
    handlers[args.command](args)


if __name__ == "__main__":
    main()
