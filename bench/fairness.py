"""Fairness: small churches' messages while one church's large broadcast runs.

One church posts a broadcast of N recipients (default 50,000); meanwhile small
churches (5 members each) post a message every `--interval` seconds, round
robin, for `--duration` seconds. For every small message the script measures
accept→sent to the provider (all 5 recipients have a provider message id) and
accept→delivered (the provider's receipts, which queue behind the large
broadcast's in the simulator as they would at a real provider) by polling the
REST API, and prints
p50 / p99 / max, split by whether the small church's queue shard is the large
church's one. Prints numbers; asserts nothing.

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
from storage.phones import PhoneVault  # noqa: E402
from storage.queue import shard_of  # noqa: E402
from storage.settings import Settings  # noqa: E402


async def signup(base: str, name: str) -> tuple[uuid.UUID, str]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        answer = await client.post("/v1/auth/signup", json={
            "church_name": name, "email": f"{uuid.uuid4().hex[:10]}@example.org",
            "password": "benchmark-password"})
        church_id = uuid.UUID(answer.json()["data"]["church"]["id"])
        csrf = client.cookies["koinonia_csrf"]
        key = (await client.post("/v1/api-keys", json={"name": "bench"},
                                 headers={"X-CSRF-Token": csrf})).json()["data"]["key"]
    return church_id, key


async def small_message(
    base: str, key: str, group: str, latencies: list[float], handed: list[float]
) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as api:
        started = time.perf_counter()
        answer = await api.post("/v1/messages", json={"body": "Small church", "target": {"group_ids": [group]}})
        message_id = answer.json()["data"]["id"]
        deadline = started + 300
        given = False
        while time.perf_counter() < deadline:
            if not given:
                rows = (await api.get(f"/v1/messages/{message_id}/recipients")).json()["data"]
                if len(rows) == 5 and all(r["provider_message_id"] for r in rows):
                    handed.append(time.perf_counter() - started)
                    given = True
            counts = (await api.get(f"/v1/messages/{message_id}")).json()["data"]["counts"]
            if counts["delivered"] == 5:
                if not given:
                    handed.append(time.perf_counter() - started)
                latencies.append(time.perf_counter() - started)
                return
            await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> None:
    web_port, sim_port = free_ports(2)
    env = dict(os.environ)
    env.update({"KOINONIA_LOG_LEVEL": "WARNING", "KOINONIA_DB_POOL_MAX": "20"})
    stack = Stack(Path(tempfile.mkdtemp(prefix="koinonia-fair-")), http_port=web_port,
                  sim_port=sim_port, env=env, quiet=False)
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
        async with httpx.AsyncClient(base_url=base, timeout=30,
                                     headers={"Authorization": f"Bearer {big_key}"}) as api:
            big_group = (await api.post("/v1/groups", json={"name": "All"})).json()["data"]["id"]
        seed_members(stack.env["DATABASE_URL"], vault, big_id, uuid.UUID(big_group), args.recipients)

        smalls: list[tuple[str, str, bool]] = []
        for i in range(args.small):
            church_id, key = await signup(base, f"Small {i}")
            async with httpx.AsyncClient(base_url=base, timeout=30,
                                         headers={"Authorization": f"Bearer {key}"}) as api:
                group = (await api.post("/v1/groups", json={"name": "Elders"})).json()["data"]["id"]
                for j in range(5):
                    await api.post("/v1/members", json={
                        "first_name": "E", "phone": f"+1202{2000000 + i * 10 + j:07d}",
                        "group_ids": [group]})
            smalls.append((key, group, shard_of(church_id, shards) == shard_of(big_id, shards)))
        say(f"{sum(s[2] for s in smalls)} of {len(smalls)} small churches share the large one's shard")

        async with httpx.AsyncClient(base_url=base, timeout=30,
                                     headers={"Authorization": f"Bearer {big_key}"}) as api:
            answer = await api.post("/v1/messages", json={"body": "Big broadcast", "target": {"group_ids": [big_group]}})
            assert answer.status_code == 202, answer.text
        say(f"large broadcast of {args.recipients:,} accepted; small messages every {args.interval} s")
        same: list[float] = []
        other: list[float] = []
        same_sent: list[float] = []
        other_sent: list[float] = []
        tasks = []
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < args.duration:
            key, group, shared = smalls[n % len(smalls)]
            tasks.append(asyncio.create_task(small_message(
                base, key, group, same if shared else other, same_sent if shared else other_sent)))
            n += 1
            await asyncio.sleep(args.interval)
        say("waiting for the small messages to finish")
        await asyncio.gather(*tasks)
        print()
        rows = (
            ("other shard: accept→sent to provider", other_sent),
            ("other shard: accept→delivered", other),
            ("same shard: accept→sent to provider", same_sent),
            ("same shard: accept→delivered", same),
        )
        for label, values in rows:
            if values:
                print(f"{label:40s} n={len(values):3d}  p50 {percentile(values, 0.5):6.2f} s"
                      f"  p99 {percentile(values, 0.99):6.2f} s  max {max(values):6.2f} s")
            else:
                print(f"{label:40s} n=  0")
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipients", type=int, default=50_000)
    parser.add_argument("--small", type=int, default=8)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=30.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
