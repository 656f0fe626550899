"""Send estimates against the actual finish: one broadcast paced by its number's limit.

Runs the real stack (embedded Postgres and Redis, the simulator at zero latency,
web, one worker, scheduler) with ``KOINONIA_SEND_RATE_PER_NUMBER`` (50 texts/s by
default), seeds N members into one group with COPY, asks
``POST /v1/messages/estimate``, posts the broadcast and follows it. It prints the
estimate before sending, at acceptance, and as the broadcast passes 10, 25, 50,
75 and 90 % of its audience, each against the actual finish (when the last
recipient was handed to the provider: no recipient ``queued`` or ``sending``
left), and the error as a share of the time that was left when the estimate was
made (goal: within ±10 %). It asserts nothing.

    uv run python bench/estimate.py                      # 20,000 at 50/s: ~400 s
    uv run python bench/estimate.py --recipients 2000    # a smoke run, ~40 s

The running estimates are the broadcast's ``data.estimate`` (``GET
/v1/messages/{id}``) when the API gives it, else ``estimate_of`` computed here
against the same stores (api/estimates.py: the code the API runs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import seed_members  # noqa: E402

from api.estimates import estimate_of  # noqa: E402
from deploy.stack import Stack, free_ports  # noqa: E402
from storage.domain.phones import PhoneVault  # noqa: E402
from storage.pg.messages import get_message  # noqa: E402
from storage.process.services import Services  # noqa: E402
from storage.process.settings import Settings  # noqa: E402

MARKS = (0.10, 0.25, 0.50, 0.75, 0.90)


def say(text: str) -> None:
    print(f"[estimate] {text}", file=sys.stderr, flush=True)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Sample:
    def __init__(self, label: str, made_at: datetime, finishes_at: datetime, source: str) -> None:
        self.label = label
        self.made_at = made_at
        self.finishes_at = finishes_at
        self.source = source


async def current_estimate(
    api: httpx.AsyncClient,
    services: Services,
    church_id: uuid.UUID,
    message_id: str,
    detail: dict[str, Any],
) -> tuple[datetime, str]:
    found = detail.get("estimate")
    if isinstance(found, dict) and "finishes_at" in found:
        return _at(found["finishes_at"]), "GET /v1/messages/{id}"
    async with services.pool.connection() as conn:
        message = await get_message(conn, church_id, uuid.UUID(message_id))
        estimate = await estimate_of(services, conn, church_id, message)
    return estimate.finishes_at, "estimate_of"


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="koinonia-bench-estimate-"))
    web_port, sim_port = free_ports(2)
    env = dict(os.environ)
    env.update(
        {
            "KOINONIA_LOG_LEVEL": os.environ.get("KOINONIA_LOG_LEVEL", "WARNING"),
            "KOINONIA_DB_POOL_MAX": "20",
            "KOINONIA_RATE_STARTER": "1000000",
            "KOINONIA_RATE_API_KEY": "1000000",
            "KOINONIA_SEND_RATE_PER_NUMBER": str(args.rate),
        }
    )
    for name in ("REDIS_CLUSTER_NODES", "KOINONIA_DEV_REDIS_CLUSTER"):
        env.pop(name, None)
    stack = Stack(
        data_dir, http_port=web_port, sim_port=sim_port, env=env, fast_unsafe=True, quiet=False
    )
    services: Services | None = None
    try:
        await asyncio.to_thread(stack.start_stores)
        stack.spawn("simulator", "simulator")
        stack.spawn("web", "web")
        stack.spawn("worker0", "worker", "--name", "bench-0")
        stack.spawn("scheduler", "scheduler")
        await asyncio.to_thread(stack.wait_ready)
        settings = Settings.from_env(stack.env)
        services = await Services.open(settings)
        vault = PhoneVault(settings.security.phone_key, settings.security.lookup_key)
        base = f"http://127.0.0.1:{web_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            signup = await client.post(
                "/v1/auth/signup",
                json={
                    "church_name": "Bench",
                    "email": f"bench-{uuid.uuid4().hex[:8]}@example.org",
                    "password": "benchmark-password",
                },
            )
            church_id = uuid.UUID(signup.json()["data"]["church"]["id"])
            csrf = client.cookies["koinonia_csrf"]
            key = (
                await client.post(
                    "/v1/api-keys", json={"name": "bench"}, headers={"X-CSRF-Token": csrf}
                )
            ).json()["data"]["key"]
        n = args.recipients
        async with httpx.AsyncClient(
            base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}
        ) as api:
            group = (await api.post("/v1/groups", json={"name": "All"})).json()["data"]["id"]
            seed_members(stack.env["DATABASE_URL"], vault, church_id, uuid.UUID(group), n)
            body = {"body": "Bench broadcast", "target": {"group_ids": [group]}}
            samples: list[Sample] = []
            asked = await api.post("/v1/messages/estimate", json=body)
            assert asked.status_code == 200, asked.text
            before = asked.json()["data"]
            samples.append(
                Sample(
                    "before sending",
                    datetime.now(UTC),
                    _at(before["estimate"]["finishes_at"]),
                    "POST /v1/messages/estimate",
                )
            )
            say(f"estimate: {before['recipient_count']:,} recipients, {before['estimate']}")
            answer = await api.post("/v1/messages", json=body)
            accepted_at = datetime.now(UTC)
            assert answer.status_code == 202, answer.text
            data = answer.json()["data"]
            message_id = data["id"]
            if isinstance(data.get("estimate"), dict):
                finish, source = _at(data["estimate"]["finishes_at"]), "202 of POST /v1/messages"
            else:
                finish, source = await current_estimate(api, services, church_id, message_id, {})
            samples.append(Sample("at acceptance", accepted_at, finish, source))
            marks = list(MARKS)
            actual: datetime | None = None
            deadline = time.monotonic() + args.timeout
            last_print = 0.0
            while time.monotonic() < deadline:
                detail = (await api.get(f"/v1/messages/{message_id}")).json()["data"]
                now = datetime.now(UTC)
                counts = detail["counts"]
                open_ = counts["queued"] + counts["sending"]
                handed = n - open_ - counts["skipped"]
                if detail["status"] != "queued" and open_ == 0:
                    actual = now
                    break
                while marks and handed >= marks[0] * n:
                    mark = marks.pop(0)
                    finish, source = await current_estimate(
                        api, services, church_id, message_id, detail
                    )
                    samples.append(Sample(f"at {mark:.0%} handed over", now, finish, source))
                if time.monotonic() - last_print > 10:
                    say(f"handed over {handed:,} / {n:,}")
                    last_print = time.monotonic()
                await asyncio.sleep(0.2)
            analytics = (await api.get(f"/v1/messages/{message_id}/analytics")).json()["data"]
        if actual is None:
            say("the broadcast did not finish within --timeout")
            return
        took = (actual - accepted_at).total_seconds()
        print()
        print(
            f"{n:,} recipients at {args.rate:g} texts/s on the church's number; "
            f"accepted {accepted_at:%H:%M:%S.%f}"[:-3]
        )
        print(
            f"actual finish (last handed over)  {actual:%H:%M:%S}  "
            f"{took:.1f} s after acceptance ({n / took:.1f} texts/s overall)"
        )
        print()
        print("| estimate made | finishes_at | off by | error (of the time left) | source |")
        print("|---|---|---|---|---|")
        for s in samples:
            left = (actual - s.made_at).total_seconds()
            off = (s.finishes_at - actual).total_seconds()
            error = 100 * off / left if left > 0 else float("nan")
            print(
                f"| {s.label} | {s.finishes_at:%H:%M:%S} | {off:+.1f} s | {error:+.1f} % | "
                f"{s.source} |"
            )
        timeline = analytics.get("timeline") or {"bucket_s": 0, "points": []}
        points = timeline["points"]
        print()
        print(
            f"delivery timeline: {len(points)} buckets of {timeline['bucket_s']} s, "
            f"sent {sum(p['sent'] for p in points):,}, "
            f"delivered {sum(p['delivered'] for p in points):,} (so far)"
        )
    finally:
        if services is not None:
            await services.close()
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=50.0, help="KOINONIA_SEND_RATE_PER_NUMBER")
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args()
    # ``timeout`` and job control stop a bench with SIGTERM: as an interrupt, the
    # finally blocks still stop every server the bench started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
