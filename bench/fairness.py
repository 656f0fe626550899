"""Fairness: small churches' messages while one church's large broadcast runs.

One church posts a broadcast of N recipients (default 50,000); meanwhile small
churches (5 members each) post a message every `--interval` seconds, round
robin, for `--duration` seconds. For every small message the script measures
accept→sent to the provider (all 5 recipients have a provider message id) and
accept→delivered (the provider's receipts, which queue behind the large
broadcast's in the simulator as they would at a real provider) by polling the
REST API, and prints p50 / p99 / max for every small church, marking those
announced in the same ready set as the large church. Prints numbers; asserts
nothing.

    uv run python bench/fairness.py
    uv run python bench/fairness.py --recipients 20000 --small 8 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import percentile, say, seed_members  # noqa: E402

from deploy.stack import Stack, free_ports  # noqa: E402
from storage.domain.phones import PhoneVault  # noqa: E402
from storage.process.settings import Settings  # noqa: E402
from storage.redis.queue import shard_of  # noqa: E402


async def signup(base: str, name: str) -> tuple[uuid.UUID, str]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        answer = await client.post(
            "/v1/auth/signup",
            json={
                "church_name": name,
                "email": f"{uuid.uuid4().hex[:10]}@example.org",
                "password": "benchmark-password",
            },
        )
        church_id = uuid.UUID(answer.json()["data"]["church"]["id"])
        csrf = client.cookies["koinonia_csrf"]
        key = (
            await client.post(
                "/v1/api-keys", json={"name": "bench"}, headers={"X-CSRF-Token": csrf}
            )
        ).json()["data"]["key"]
    return church_id, key


async def small_message(
    base: str, key: str, group: str, latencies: list[float], handed: list[float]
) -> None:
    """One 5-recipient message: appends accept→sent and accept→delivered (seconds)."""
    async with httpx.AsyncClient(
        base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as api:
        started = time.perf_counter()
        answer = await api.post(
            "/v1/messages", json={"body": "Small church", "target": {"group_ids": [group]}}
        )
        message_id = answer.json()["data"]["id"]
        deadline = started + 300
        # Polled every 0.1 s until sent, then every 0.5 s until delivered: the polling
        # of ~40 messages at once must not be what loads the web process.
        while time.perf_counter() < deadline:
            rows = (await api.get(f"/v1/messages/{message_id}/recipients")).json()["data"]
            if len(rows) == 5 and all(r["provider_message_id"] for r in rows):
                handed.append(time.perf_counter() - started)
                break
            await asyncio.sleep(0.1)
        while time.perf_counter() < deadline:
            counts = (await api.get(f"/v1/messages/{message_id}")).json()["data"]["counts"]
            if counts["delivered"] == 5:
                latencies.append(time.perf_counter() - started)
                return
            await asyncio.sleep(0.5)


async def run(args: argparse.Namespace) -> None:
    web_port, sim_port = free_ports(2)
    env = dict(os.environ)
    env.update({"KOINONIA_LOG_LEVEL": "WARNING", "KOINONIA_DB_POOL_MAX": "20"})
    # The load generator polls the API from one address: plan and key limits out of the way.
    env.update({"KOINONIA_RATE_STARTER": "1000000", "KOINONIA_RATE_API_KEY": "1000000"})
    stack = Stack(
        Path(tempfile.mkdtemp(prefix="koinonia-fair-")),
        http_port=web_port,
        sim_port=sim_port,
        env=env,
        quiet=False,
    )
    try:
        await asyncio.to_thread(stack.start_stores)
        stack.spawn("simulator", "simulator")
        stack.spawn("web", "web")
        stack.spawn("worker", "worker")
        stack.spawn("scheduler", "scheduler")
        await asyncio.to_thread(stack.wait_ready)
        settings = Settings.from_env(stack.env)
        vault = PhoneVault(settings.security.phone_key, settings.security.lookup_key)
        base = f"http://127.0.0.1:{web_port}"
        shards = settings.delivery.shards

        big_id, big_key = await signup(base, "Big")
        async with httpx.AsyncClient(
            base_url=base, timeout=30, headers={"Authorization": f"Bearer {big_key}"}
        ) as api:
            big_group = (await api.post("/v1/groups", json={"name": "All"})).json()["data"]["id"]
        seed_members(
            stack.env["DATABASE_URL"], vault, big_id, uuid.UUID(big_group), args.recipients
        )

        smalls: list[tuple[str, str, bool]] = []
        for i in range(args.small):
            church_id, key = await signup(base, f"Small {i}")
            async with httpx.AsyncClient(
                base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}
            ) as api:
                group = (await api.post("/v1/groups", json={"name": "Elders"})).json()["data"]["id"]
                for j in range(5):
                    await api.post(
                        "/v1/members",
                        json={
                            "first_name": "E",
                            "phone": f"+1202{2000000 + i * 10 + j:07d}",
                            "group_ids": [group],
                        },
                    )
            smalls.append((key, group, shard_of(church_id, shards) == shard_of(big_id, shards)))
        say(
            f"{sum(s[2] for s in smalls)} of {len(smalls)} small churches share the large one's ready set"
        )

        async with httpx.AsyncClient(
            base_url=base, timeout=30, headers={"Authorization": f"Bearer {big_key}"}
        ) as api:
            answer = await api.post(
                "/v1/messages", json={"body": "Big broadcast", "target": {"group_ids": [big_group]}}
            )
            assert answer.status_code == 202, answer.text
            big_message = answer.json()["data"]["id"]
        say(
            f"large broadcast of {args.recipients:,} accepted; small messages every {args.interval} s"
        )
        sent: list[list[float]] = [[] for _ in smalls]
        delivered: list[list[float]] = [[] for _ in smalls]
        tasks = []
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < args.duration:
            i = n % len(smalls)
            key, group, _shared = smalls[i]
            tasks.append(
                asyncio.create_task(small_message(base, key, group, delivered[i], sent[i]))
            )
            n += 1
            await asyncio.sleep(args.interval)
        say("waiting for the small messages to finish")
        await asyncio.gather(*tasks)
        async with httpx.AsyncClient(
            base_url=base, timeout=30, headers={"Authorization": f"Bearer {big_key}"}
        ) as api:
            counts = (await api.get(f"/v1/messages/{big_message}")).json()["data"]["counts"]
        big_sent = counts["sent"] + counts["delivered"] + counts["undelivered"]
        say(
            f"large broadcast when the small ones were done: {big_sent:,} of {args.recipients:,} sent"
        )
        print()
        print(
            "| small church | same ready set | n | accept→sent p50 / p99 / max | accept→delivered p50 / p99 |"
        )
        print("|---|---|---|---|---|")
        for i, (_key, _group, shared) in enumerate(smalls):
            print(
                f"| {i} | {'yes' if shared else 'no'} | {len(sent[i])} | "
                f"{percentile(sent[i], 0.5):.2f} / {percentile(sent[i], 0.99):.2f} / {max(sent[i], default=float('nan')):.2f} s | "
                f"{percentile(delivered[i], 0.5):.1f} / {percentile(delivered[i], 0.99):.1f} s |"
            )
        every_sent = [v for values in sent for v in values]
        every_delivered = [v for values in delivered for v in values]
        print(
            f"| all | | {len(every_sent)} | {percentile(every_sent, 0.5):.2f} / {percentile(every_sent, 0.99):.2f} / "
            f"{max(every_sent, default=float('nan')):.2f} s | {percentile(every_delivered, 0.5):.1f} / "
            f"{percentile(every_delivered, 0.99):.1f} s |"
        )
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=50_000)
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=30.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
