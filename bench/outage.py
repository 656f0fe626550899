"""Provider outage at full length: a broadcast, a 60 s outage, a burst of 429s, recovery.

Runs the real stack with production delivery settings (first retry after 2 s,
5 attempts, unless ``--env`` overrides them), seeds N members into one group with
COPY (setup, not measured), posts one broadcast through the REST API and, once
the provider has sent ``--outage-at`` of the audience's texts, drives the
simulator through the scenario:

    normal ──► outage (503 + Retry-After: 1) for --outage-s
           ──► rate limit of --rate-per-s (429 + Retry-After) for --burst-s
           ──► normal, until every recipient is final (or --timeout)

Then it reports the time to full delivery, the retry depth (recipient attempts,
from Postgres), duplicates and losses (texts per destination, from the
simulator), dead letters (the dead-letter stream) and the throughput curve
(recipients delivered per 5 s, with the phase each window ended in). Prints
numbers; asserts nothing.

    uv run python bench/outage.py                          # 10,000 recipients
    uv run python bench/outage.py --recipients 20000 --outage-s 60 --rate-per-s 50
    uv run python bench/outage.py --env KOINONIA_MAX_ATTEMPTS=8   # any setting
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import httpx
import msgspec
import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import seed_members  # noqa: E402

from deploy.stack import Stack, free_ports  # noqa: E402
from storage.domain.phones import PhoneVault  # noqa: E402
from storage.process.settings import Settings  # noqa: E402
from storage.redis import key_names  # noqa: E402

WINDOW_S = 5.0
SAMPLE_S = 0.25

Counts = dict[str, int]


def say(text: str) -> None:
    print(f"[outage] {text}", file=sys.stderr, flush=True)


def final(counts: Counts) -> int:
    return counts["delivered"] + counts["failed"] + counts["undelivered"] + counts["skipped"]


class Scenario:
    """The phases, driven by the samples: which one runs, and when each began."""

    def __init__(self, sim: httpx.Client, args: argparse.Namespace) -> None:
        self.sim = sim
        self.args = args
        self.phase = "normal"
        self.began: dict[str, float] = {}

    def _configure(self, **config: object) -> None:
        self.sim.post("/_sim/config", json=config).raise_for_status()

    def step(self, now: float, counts: Counts, sent: int) -> None:
        """Move on when due. ``sent`` is the provider's count: the worker sends far
        ahead of the receipts that move recipients to sent and delivered."""
        args = self.args
        if self.phase == "normal" and "outage" not in self.began:
            if sent >= args.outage_at * args.recipients:
                self._configure(outage=True)
                self._enter("outage", now, counts)
        elif self.phase == "outage" and now - self.began["outage"] >= args.outage_s:
            self._configure(outage=False, rate_limit_per_s=args.rate_per_s)
            self._enter("429s", now, counts)
        elif self.phase == "429s" and now - self.began["429s"] >= args.burst_s:
            self._configure(rate_limit_per_s=None)
            self._enter("recovery", now, counts)

    def _enter(self, phase: str, now: float, counts: Counts) -> None:
        self.phase = phase
        self.began[phase] = now
        say(f"{phase} begins: delivered {counts['delivered']:,}, failed {counts['failed']:,}")

    def restore(self) -> None:
        self._configure(outage=False, rate_limit_per_s=None)


class Sample(NamedTuple):
    at: float
    counts: Counts
    sent: int
    """Texts the provider has sent (the simulator's count; this stack sends nothing else)."""
    phase: str


def follow(
    api: httpx.Client, message_id: str, scenario: Scenario, n: int, timeout_s: float
) -> list[Sample]:
    samples: list[Sample] = []
    deadline = time.monotonic() + timeout_s
    last_print = 0.0
    while time.monotonic() < deadline:
        answer = api.get(f"/v1/messages/{message_id}")
        if answer.status_code != 200:
            say(f"progress answered {answer.status_code}: {answer.text[:200]}")
            time.sleep(SAMPLE_S)
            continue
        counts: Counts = answer.json()["data"]["counts"]
        sent = int(scenario.sim.get("/_sim/stats").json()["total"])
        now = time.monotonic()
        scenario.step(now, counts, sent)
        samples.append(Sample(now, counts, sent, scenario.phase))
        if now - last_print > 5:
            say(
                f"{scenario.phase:8}  provider sent {sent:,}  delivered "
                f"{counts['delivered']:,}  failed {counts['failed']:,}  / {n:,}"
            )
            last_print = now
        # Done when everything is final and the scenario has run its course.
        if final(counts) >= n and scenario.phase in ("normal", "recovery") and scenario.began:
            break
        time.sleep(SAMPLE_S)
    return samples


def dead_letters(redis_url: str, message_id: str) -> tuple[int, int]:
    """(entries, recipients) in dead-letter streams that name this message."""
    needle = message_id.encode()
    client = redis.Redis.from_url(redis_url)
    try:
        streams = {key_names.DEAD_LETTER_STREAM.encode()}
        streams.update(n for n in client.scan_iter(match="*dead*") if client.type(n) == b"stream")
        entries = recipients = 0
        for stream in streams:
            for _entry_id, fields in client.xrange(stream):
                if not any(needle in value for value in fields.values()):
                    continue
                entries += 1
                recipients += _recipients_in(fields)
        return entries, recipients
    finally:
        client.close()


def _recipients_in(fields: dict[bytes, bytes]) -> int:
    for value in fields.values():
        try:
            entry = msgspec.msgpack.decode(value)
        except msgspec.DecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("recipient_ids"), list):
            return len(entry["recipient_ids"])
    return 1


def window_table(samples: list[Sample], t0: float) -> list[tuple[float, int, int, int, str]]:
    """Per window: (end s, provider sends, delivered, failed, phase at its end)."""
    rows: list[tuple[float, int, int, int, str]] = []
    edge, sent, delivered, failed = t0 + WINDOW_S, 0, 0, 0
    last: Sample | None = None

    def row(end: float, s: Sample) -> None:
        nonlocal sent, delivered, failed
        rows.append(
            (
                end - t0,
                s.sent - sent,
                s.counts["delivered"] - delivered,
                s.counts["failed"] - failed,
                s.phase,
            )
        )
        sent, delivered, failed = s.sent, s.counts["delivered"], s.counts["failed"]

    for sample in samples:
        while sample.at >= edge and last is not None:
            row(edge, last)
            edge += WINDOW_S
        last = sample
    if last is not None and (last.sent, last.counts["delivered"], last.counts["failed"]) != (
        sent,
        delivered,
        failed,
    ):
        row(last.at, last)
    return rows


def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="koinonia-outage-"))
    web_port, sim_port = free_ports(2)
    env = dict(os.environ)
    env.update(
        {
            "KOINONIA_LOG_LEVEL": os.environ.get("KOINONIA_LOG_LEVEL", "WARNING"),
            "KOINONIA_DB_POOL_MAX": "20",
            # The bench polls progress 4 times a second for minutes: no plan limit
            # should answer it (or the scenario) with 429.
            "KOINONIA_RATE_STARTER": "1000000",
            "KOINONIA_RATE_API_KEY": "1000000",
        }
    )
    for pair in args.env:
        name, _, value = pair.partition("=")
        env[name] = value
    stack = Stack(data_dir, http_port=web_port, sim_port=sim_port, env=env, fast_unsafe=args.unsafe)
    sim = httpx.Client(base_url=f"http://127.0.0.1:{sim_port}", timeout=30)
    scenario = Scenario(sim, args)
    try:
        stack.start_stores()
        stack.start_processes()
        stack.wait_ready()
        settings = Settings.from_env(stack.env)
        vault = PhoneVault(settings.security.phone_key, settings.security.lookup_key)
        base = f"http://127.0.0.1:{web_port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            signup = client.post(
                "/v1/auth/signup",
                json={
                    "church_name": "Outage bench",
                    "email": f"outage-{uuid.uuid4().hex[:8]}@example.org",
                    "password": "benchmark-password",
                },
            )
            church_id = uuid.UUID(signup.json()["data"]["church"]["id"])
            csrf = client.cookies["koinonia_csrf"]
            key = client.post(
                "/v1/api-keys", json={"name": "bench"}, headers={"X-CSRF-Token": csrf}
            ).json()["data"]["key"]
        with httpx.Client(
            base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}
        ) as api:
            group = api.post("/v1/groups", json={"name": "All"}).json()["data"]["id"]
            seed_members(
                stack.env["DATABASE_URL"], vault, church_id, uuid.UUID(group), args.recipients
            )
            phones = [f"+1201{2000000 + i:07d}" for i in range(args.recipients)]
            say("posting the broadcast")
            answer = api.post(
                "/v1/messages",
                json={"body": "Outage bench", "target": {"group_ids": [group]}},
            )
            assert answer.status_code == 202, answer.text
            t0 = time.monotonic()
            message_id = answer.json()["data"]["id"]
            samples = follow(api, message_id, scenario, args.recipients, args.timeout)
        scenario.restore()
        by_destination = sim.get("/_sim/stats").json()["by_destination"]
        texts = [int(by_destination.get(p, 0)) for p in phones]
        entries, dead = dead_letters(stack.env["REDIS_URL"], message_id)
        with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
            attempts = Counter(
                {
                    int(r[0]): int(r[1])
                    for r in conn.execute(
                        "SELECT attempts, count(*) FROM message_recipient WHERE message_id = %s "
                        "GROUP BY 1",
                        (uuid.UUID(message_id),),
                    ).fetchall()
                }
            )
            errors = conn.execute(
                "SELECT error_code, count(*) FROM message_recipient WHERE message_id = %s "
                "AND status = 'failed' GROUP BY 1 ORDER BY 2 DESC",
                (uuid.UUID(message_id),),
            ).fetchall()
        report(args, samples, t0, scenario, texts, entries, dead, attempts, errors)
    finally:
        sim.close()
        stack.stop()


def report(
    args: argparse.Namespace,
    samples: list[Sample],
    t0: float,
    scenario: Scenario,
    texts: list[int],
    dead_entries: int,
    dead: int,
    attempts: Counter[int],
    errors: list[tuple[str | None, int]],
) -> None:
    n = args.recipients
    last = samples[-1].counts
    all_delivered = next((s.at for s in samples if s.counts["delivered"] >= n), None)
    all_sent = next((s.at for s in samples if s.sent >= n), None)
    recovered = scenario.began.get("recovery")
    outage_end = scenario.began.get("429s")
    print()
    print(
        f"recipients                {n:,}   (outage once {args.outage_at:.0%} sent, "
        f"{args.outage_s:.0f} s; then {args.rate_per_s:g}/s for {args.burst_s:.0f} s)"
    )
    print(f"settings overridden       {' '.join(args.env) or 'none (production defaults)'}")
    for phase in ("outage", "429s", "recovery"):
        if phase in scenario.began:
            print(f"{phase + ' began':25} {scenario.began[phase] - t0:7.1f} s")
    if all_sent is not None:
        print(f"all sent to the provider  {all_sent - t0:7.1f} s")
    if all_delivered is not None:
        since = (
            f"   ({all_delivered - outage_end:.1f} s after the outage, "
            f"{all_delivered - recovered:.1f} s after the 429s ended)"
            if outage_end is not None and recovered is not None and all_delivered > recovered
            else ""
        )
        print(f"time to full delivery     {all_delivered - t0:7.1f} s{since}")
    else:
        print(
            f"time to full delivery     never: {last['delivered']:,} delivered, "
            f"{last['failed']:,} failed, {n - final(last):,} not final after "
            f"{samples[-1].at - t0:.1f} s"
        )
    depth = max(attempts) if attempts else 0
    histogram = ", ".join(f"{a}: {attempts[a]:,}" for a in sorted(attempts))
    print(f"max retry depth           {depth} attempts   (attempts: recipients = {histogram})")
    print(
        f"duplicates                {sum(max(0, t - 1) for t in texts):,} extra texts "
        f"to {sum(t > 1 for t in texts):,} destinations"
    )
    print(f"lost (never texted)       {texts.count(0):,}")
    print(f"dead letters              {dead:,} recipients in {dead_entries:,} entries")
    if errors:
        print(f"failed by error code      {', '.join(f'{e}: {c:,}' for e, c in errors)}")
    print()
    print("throughput: recipients per 5 s window")
    print("| window end (s) | provider sends | delivered | failed | phase at the end |")
    print("|---:|---:|---:|---:|---|")
    for end, sent, delivered, failed, phase in window_table(samples, t0):
        print(f"| {end:.0f} | {sent:,} | {delivered:,} | {failed:,} | {phase} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument(
        "--outage-at", type=float, default=0.3, help="share the provider sends first"
    )
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--rate-per-s", type=float, default=50.0, help="limit during the 429s")
    parser.add_argument("--burst-s", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a setting for the stack"
    )
    parser.add_argument(
        "--unsafe", action="store_true", help="Postgres without fsync (faster, not durable)"
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
