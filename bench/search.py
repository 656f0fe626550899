"""Conversation search (``GET /v1/conversations?q=``) on 1,000,000 conversation messages.

Starts the embedded Postgres and Redis only (no web: the figures are those of the
repository function ``search_conversations`` called through psycopg, as the web
process calls it, so HTTP and the envelope are not in them), seeds one church with
``--messages`` conversation messages over ``--months`` months in ``--conversations``
conversations (one member each), and a few neighbour churches with the same words,
all with COPY; then runs ``--runs`` searches of each shape, first page of 50, and
prints p50 / p99 per shape in milliseconds. Goal: p99 < 50 ms.

Bodies draw their words from a Zipf-like vocabulary (a few words in most texts,
most words rare), so "common", "middle" and "rare" are real frequencies; a
"clustered" word is said 3,000 times in five conversations only (a word the walk
would read every conversation for, were it chosen).

    uv run python bench/search.py                          # 1,000,000 messages, fsync off
    uv run python bench/search.py --data-dir /tmp/search   # keep (and reuse) the seeded data

Prints numbers; asserts nothing. Progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.stack import Stack, free_ports  # noqa: E402
from storage.domain.ids import uuid7  # noqa: E402
from storage.domain.phones import PhoneVault  # noqa: E402
from storage.pg.conversation_search import search_conversations  # noqa: E402
from storage.pg.conversations import ConversationFilter  # noqa: E402
from storage.pg.database import connection_kwargs  # noqa: E402
from storage.pg.partitions import MONTHS_AHEAD, ensure_partitions, month_start  # noqa: E402
from storage.process.settings import DatabaseSettings  # noqa: E402

MARKER = "bench-search.json"
DAY_MS = 86_400_000
FIRST = [
    "Maria",
    "Jose",
    "Ana",
    "Juan",
    "Luis",
    "Carmen",
    "David",
    "Sarah",
    "Grace",
    "John",
    "Mary",
    "James",
    "Ruth",
    "Esther",
    "Paul",
    "Peter",
    "Rebecca",
    "Daniel",
    "Samuel",
    "Hannah",
    "Miriam",
    "Joseph",
    "Elena",
    "Sofia",
    "Lucas",
    "Mateo",
    "Olivia",
    "Noah",
    "Emma",
    "Liam",
    "Ava",
    "Ethan",
    "Mia",
    "Isaac",
    "Leah",
    "Caleb",
    "Abigail",
    "Aaron",
    "Naomi",
    "Silas",
    "Lydia",
    "Priscilla",
]
LAST = [
    "Garcia",
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
]
COMMON = [
    "the",
    "you",
    "i",
    "to",
    "and",
    "a",
    "is",
    "for",
    "we",
    "at",
    "see",
    "thanks",
    "sunday",
    "can",
    "will",
    "be",
    "on",
    "in",
    "this",
    "service",
    "church",
    "me",
    "my",
    "please",
    "pray",
    "prayer",
    "today",
    "time",
    "what",
    "when",
    "tomorrow",
    "yes",
    "no",
    "ok",
    "group",
]
RARE = "xylophone"
"""Said in exactly 20 messages of the big church."""
CLUSTERED = "hallelujah"
"""Said 3,000 times, all in the five chattiest conversations."""


def say(text: str) -> None:
    print(f"[search] {text}", file=sys.stderr, flush=True)


def vocabulary(rng: random.Random, size: int = 5000) -> tuple[list[str], list[float]]:
    """Words (the common ones first) and Zipf weights (1/rank)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list(COMMON)
    seen = set(words) | {RARE, CLUSTERED}
    while len(words) < size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(4, 9)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words, [1 / (rank + 1) for rank in range(size)]


def bodies(rng: random.Random, words: list[str], weights: list[float], n: int) -> Iterator[str]:
    cum = list(_accumulate(weights))
    for _ in range(n):
        picked = rng.choices(words, cum_weights=cum, k=rng.randint(3, 14))
        text = " ".join(picked)
        yield text[0].upper() + text[1:] + rng.choice((".", "!", "?", "", " :)"))


def _accumulate(weights: list[float]) -> Iterator[float]:
    total = 0.0
    for w in weights:
        total += w
        yield total


def _partitions(url: str, first: date, last: date) -> None:
    """Every month's partitions from ``first`` to ``last`` (and the usual months
    ahead), made by the code migrations and the scheduler use."""
    ahead = (last.year - first.year) * 12 + last.month - first.month + MONTHS_AHEAD

    async def make() -> None:
        async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
            await ensure_partitions(conn, today=first, ahead=ahead)

    asyncio.run(make())


def seed_church(
    conn: psycopg.Connection,
    vault: PhoneVault,
    rng: random.Random,
    *,
    name: str,
    area: int,
    conversations: int,
    messages: int,
    start_ms: int,
    end_ms: int,
    vocab: tuple[list[str], list[float]],
    special: bool,
) -> dict[str, object]:
    """One church: members, one conversation each, ``messages`` messages; returns what
    the searches need (its id, a member's name and phone)."""
    church_id = uuid7(start_ms - 30 * DAY_MS)
    conn.execute(
        "WITH c AS (INSERT INTO church (id, name, phone_number) "
        "VALUES (%s, %s, '+1555' || lpad(nextval('sending_number_seq')::text, 7, '0')) "
        "RETURNING phone_number, id) "
        "INSERT INTO church_number_lookup (phone_number, church_id) SELECT * FROM c",
        (church_id, name),
    )
    members = [uuid7(start_ms - 20 * DAY_MS + i) for i in range(conversations)]
    phones = [f"+1{area}{2000000 + i:07d}" for i in range(conversations)]
    names = [(rng.choice(FIRST), rng.choice(LAST)) for _ in range(conversations)]
    with conn.cursor().copy(
        "COPY member (church_id, id, first_name, last_name, phone_cipher, phone_hash) FROM STDIN"
    ) as copy:
        for member, phone, (first, last) in zip(members, phones, names, strict=True):
            copy.write_row(
                (church_id, member, first, last, vault.encrypt(church_id, phone),
                 vault.lookup_hash(phone))
            )  # fmt: skip
    # Who writes: a few chatty conversations, most quiet (weights 1/rank again).
    conv_weights = [1 / (k + 10) for k in range(conversations)]
    rng.shuffle(conv_weights)
    stamps = sorted(rng.randrange(start_ms, end_ms) for _ in range(messages))
    owners = rng.choices(range(conversations), weights=conv_weights, k=messages)
    conv_ids = [uuid7(start_ms - 10 * DAY_MS + i) for i in range(conversations)]
    first_at = [end_ms] * conversations
    last_at = [start_ms] * conversations
    for ms, owner in zip(stamps, owners, strict=True):
        first_at[owner] = min(first_at[owner], ms)
        last_at[owner] = max(last_at[owner], ms)
    # The five chattiest conversations: where the clustered word lives.
    sizes = Counter(owners)
    clustered = {c for c, _ in sizes.most_common(5)}
    rare_at = set(rng.sample(range(messages), 20)) if special else set()
    with conn.cursor().copy(
        "COPY conversation (church_id, id, member_id, status, unread_count, last_message_at, "
        "created_at) FROM STDIN"
    ) as copy:
        for c in range(conversations):
            if last_at[c] == start_ms:  # never wrote: no conversation
                continue
            copy.write_row(
                (church_id, conv_ids[c], members[c], "open" if c % 3 else "closed", c % 2,
                 _ts(last_at[c]), _ts(first_at[c]))
            )  # fmt: skip
    text = bodies(rng, *vocab, messages)
    clustered_left = 3000 if special else 0
    began = time.perf_counter()
    with conn.cursor().copy(
        "COPY conversation_message (church_id, id, created_at, conversation_id, direction, "
        "body, status) FROM STDIN"
    ) as copy:
        for i, (ms, owner) in enumerate(zip(stamps, owners, strict=True)):
            body = next(text)
            if i in rare_at:
                body += f" {RARE}"
            if clustered_left and owner in clustered:
                body += f" {CLUSTERED}"
                clustered_left -= 1
            inbound = i % 2 == 0
            copy.write_row(
                (church_id, uuid7(ms), _ts(ms), conv_ids[owner],
                 "inbound" if inbound else "outbound", body,
                 "received" if inbound else "delivered")
            )  # fmt: skip
            if (i + 1) % 100_000 == 0:
                say(f"{name}: {i + 1:,} messages ({time.perf_counter() - began:.0f} s)")
    if special and clustered_left:
        say(f"note: only {3000 - clustered_left} of 3000 clustered words placed")
    conn.commit()
    pick = next(c for c in range(conversations) if last_at[c] > start_ms)
    return {
        "church_id": str(church_id),
        "name": " ".join(names[pick]),
        "phone": phones[pick],
    }


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def seed(url: str, vault: PhoneVault, args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(16)
    began = time.perf_counter()
    today = datetime.now(UTC).date()
    first = today
    for _ in range(args.months):
        first = month_start(first - timedelta(days=1))
    start_ms = int(datetime(first.year, first.month, 1, tzinfo=UTC).timestamp() * 1000) + DAY_MS
    end_ms = time.time_ns() // 1_000_000 - 3_600_000
    vocab = vocabulary(rng)
    _partitions(url, first, today)
    with psycopg.connect(url) as conn:
        # Built once after the load (as the migration defines it) rather than row by row.
        row = conn.execute(
            "SELECT pg_get_indexdef('conversation_message_search'::regclass)"
        ).fetchone()
        assert row is not None
        # The parent's definition reads "ON ONLY" (that parent alone): every partition's.
        index_def = str(row[0]).replace(" ON ONLY ", " ON ")
        conn.execute("DROP INDEX conversation_message_search")
        conn.commit()
        big = seed_church(
            conn, vault, rng, name="Bench search", area=301,
            conversations=args.conversations, messages=args.messages,
            start_ms=start_ms, end_ms=end_ms, vocab=vocab, special=True,
        )  # fmt: skip
        for i in range(args.neighbours):
            seed_church(
                conn, vault, rng, name=f"Bench neighbour {i + 1}", area=302 + i,
                conversations=300, messages=args.neighbour_messages,
                start_ms=start_ms, end_ms=end_ms, vocab=vocab, special=False,
            )  # fmt: skip
        say(f"building the search index ({time.perf_counter() - began:.0f} s so far)")
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute(index_def)
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("church", "member", "conversation", "conversation_message"):
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
    say(f"seeded in {time.perf_counter() - began:.0f} s")
    return big


def shapes(seeded: dict[str, object]) -> list[tuple[str, str, ConversationFilter | None]]:
    first, last = str(seeded["name"]).split()
    return [
        ("common word", "sunday", None),
        ("common word, open only", "sunday", ConversationFilter(status="open")),
        ("two common words", "thanks pray", None),
        ("middle word", "service church", None),
        ("rare word", RARE, None),
        ("clustered word", CLUSTERED, None),
        ("prefix", "tom", None),
        ("name", f"{first} {last}", None),
        ("full phone", str(seeded["phone"]), None),
        ("national phone", str(seeded["phone"])[2:], None),
        ("no match", "zzqxv nothing", None),
    ]


async def measure(
    url: str, vault: PhoneVault, seeded: dict[str, object], runs: int
) -> list[tuple[str, str, float, float, int]]:
    church_id = uuid.UUID(str(seeded["church_id"]))
    out = []
    # As the web process's pool opens them (statements prepared on first use).
    kwargs = connection_kwargs(DatabaseSettings(url=url))
    async with await psycopg.AsyncConnection.connect(url, **kwargs) as conn:
        for label, q, where in shapes(seeded):
            times = []
            found = 0
            for _ in range(runs):
                started = time.perf_counter()
                page = await search_conversations(
                    conn, church_id, vault, q=q, limit=50, cursor=None, where=where
                )
                times.append((time.perf_counter() - started) * 1000)
                found = len(page.items)
            times.sort()
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
            out.append((label, q, statistics.median(times), p99, found))
            say(f"{label}: p50 {statistics.median(times):.1f} ms, p99 {p99:.1f} ms")
    return out


def run(args: argparse.Namespace) -> None:
    keep = args.data_dir is not None
    data_dir = Path(args.data_dir) if keep else Path(tempfile.mkdtemp(prefix="koinonia-search-"))
    web_port, sim_port = free_ports(2)
    stack = Stack(
        data_dir,
        http_port=web_port,
        sim_port=sim_port,
        env={**os.environ, "KOINONIA_LOG_LEVEL": "WARNING"},
        fast_unsafe=not args.fsync,
        quiet=True,
    )
    try:
        env = stack.start_stores()
        url = env["DATABASE_URL"]
        vault = PhoneVault(
            base64.b64decode(env["KOINONIA_PHONE_KEY"]),
            base64.b64decode(env["KOINONIA_LOOKUP_KEY"]),
        )
        marker = data_dir / MARKER
        if marker.exists():
            seeded = json.loads(marker.read_text())
            say("reusing the seeded database")
        else:
            seeded = seed(url, vault, args)
            marker.write_text(json.dumps(seeded))
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM conversation_message WHERE church_id = %s",
                (uuid.UUID(str(seeded["church_id"])),),
            ).fetchone()
        total = row[0] if row else 0
        say(f"measuring: {args.runs} searches per shape (and {args.runs // 5} warm-up)")
        asyncio.run(measure(url, vault, seeded, max(1, args.runs // 5)))
        results = asyncio.run(measure(url, vault, seeded, args.runs))
        print(
            f"{total:,} conversation messages in the church; first page of 50; "
            "search_conversations through psycopg (no HTTP)"
        )
        print(f"{'shape':<24} {'q':<26} {'p50 ms':>7} {'p99 ms':>7} {'found':>6}")
        for label, q, p50, p99, found in results:
            print(f"{label:<24} {q[:26]:<26} {p50:7.1f} {p99:7.1f} {found:6d}")
    finally:
        stack.stop()
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--conversations", type=int, default=3000)
    parser.add_argument("--months", type=int, default=6)
    parser.add_argument("--neighbours", type=int, default=4)
    parser.add_argument("--neighbour-messages", type=int, default=25_000)
    parser.add_argument("--runs", type=int, default=200, help="searches per shape")
    parser.add_argument("--data-dir", help="keep the seeded cluster here and reuse it")
    parser.add_argument("--fsync", action="store_true", help="fsync on (slower seeding)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
