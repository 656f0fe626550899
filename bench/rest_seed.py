"""Seed the REST bench's database: a big church and a few neighbours, months of history.

Members are written with COPY from Python (their phones are AES-GCM ciphertext,
which SQL cannot make); everything else is server-side ``INSERT ... SELECT
generate_series``. Partitioned rows get UUIDv7 ids made in SQL from the same
millisecond as their ``created_at`` (the invariant storage/domain/ids.py relies on
to prune by id), and recipient ids are built the way the materializer builds
them (the message id's first 80 bits and a row number).

The seeded cluster is kept in the data folder and reused by later runs; a
marker file there says what was seeded and holds the bench church's API key.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import msgspec
import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from storage.domain.ids import uuid7  # noqa: E402
from storage.domain.phones import PhoneVault  # noqa: E402
from storage.pg.credentials import create_api_key  # noqa: E402
from storage.pg.partitions import (  # noqa: E402
    FILLFACTOR,
    PARTITIONED_TABLES,
    month_start,
    next_month,
    partition_name,
)

MARKER = "bench-rest.json"
SEED_VERSION = 1
DAY_MS = 86_400_000


def say(text: str) -> None:
    print(f"[rest] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SeedPlan:
    members: int = 20_000
    broadcasts: int = 2_000
    months: int = 6
    conversations: int = 3_000
    neighbours: int = 4
    neighbour_members: int = 2_000
    neighbour_broadcasts: int = 200
    neighbour_conversations: int = 300


@dataclass(frozen=True)
class Seeded:
    church_id: str
    api_key: str
    recipients: int
    messages: int
    conversations: int
    conversation_messages: int
    seconds: float
    plan: dict[str, int]
    version: int = SEED_VERSION


# UUIDv7 from a Unix millisecond: 48-bit ms, version 7, then 74 random bits with
# the RFC 9562 variant (taken from gen_random_uuid(), whose variant nibble is
# already 8..b). created_at is always made from the same ms, never the reverse.
_FUNCTIONS = """
CREATE OR REPLACE FUNCTION pg_temp.uuid7_at(ms bigint) RETURNS uuid LANGUAGE sql VOLATILE AS $$
  SELECT (lpad(to_hex(ms), 12, '0') || '7' || substr(r, 14, 3) || substr(r, 17, 16))::uuid
  FROM (SELECT replace(gen_random_uuid()::text, '-', '') AS r) g
$$;
CREATE OR REPLACE FUNCTION pg_temp.ts_of(ms bigint) RETURNS timestamptz LANGUAGE sql IMMUTABLE AS $$
  SELECT timestamptz 'epoch' + ms * interval '1 millisecond'
$$;
"""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _months_between(first: date, last: date) -> list[date]:
    months = [month_start(first)]
    while months[-1] < month_start(last):
        months.append(next_month(months[-1]))
    return months


def _create_partitions(conn: psycopg.Connection, months: list[date]) -> list[str]:
    created = []
    for table in PARTITIONED_TABLES:
        for month in months:
            name = partition_name(table, month)
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
            if row and row[0]:
                continue
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({}) "
                    "WITH (fillfactor = {})"
                ).format(
                    sql.Identifier(name),
                    sql.Identifier(table),
                    sql.Literal(f"{month.isoformat()} 00:00:00+00"),
                    sql.Literal(f"{next_month(month).isoformat()} 00:00:00+00"),
                    sql.Literal(FILLFACTOR.get(table, 100)),
                )
            )
            created.append(name)
    return created


def _copy_members(
    conn: psycopg.Connection,
    vault: PhoneVault,
    church_id: uuid.UUID,
    n: int,
    area: int,
    joined_ms: int,
) -> None:
    with conn.cursor().copy(
        "COPY member (church_id, id, first_name, last_name, phone_cipher, phone_hash, "
        "opted_in, created_at, opt_changed_at) FROM STDIN"
    ) as copy:
        for i in range(n):
            phone = f"+1{area}{2000000 + i:07d}"
            at_ms = joined_ms + i * 37
            joined = datetime.fromtimestamp(at_ms / 1000, UTC)
            copy.write_row(
                (
                    church_id,
                    uuid7(at_ms),
                    f"Member{i}",
                    "Bench",
                    vault.encrypt(church_id, phone),
                    vault.lookup_hash(phone),
                    i % 37 != 0,  # ~2.7 % opted out
                    joined,
                    joined,
                )
            )


def _seed_church(
    conn: psycopg.Connection,
    church_id: uuid.UUID,
    *,
    members: int,
    broadcasts: int,
    conversations: int,
    start_ms: int,
    end_ms: int,
    label: str,
) -> tuple[int, int, int]:
    """Broadcasts with their recipient rows and conversations for one church
    (members already in place). Returns (recipient rows, conversation messages)."""
    began = time.perf_counter()
    params = {
        "church": church_id,
        "n": broadcasts,
        "start": start_ms,
        "span": end_ms - start_ms,
        "members": members,
    }
    # Groups, each holding a slice of the members (targets name them).
    conn.execute(
        "INSERT INTO member_group (church_id, id, name, created_at) "
        "SELECT %(church)s, pg_temp.uuid7_at(%(start)s - 86400000 + g), 'Group ' || g, "
        "pg_temp.ts_of(%(start)s - 86400000 + g) FROM generate_series(1, 10) g",
        params,
    )
    conn.execute(
        "INSERT INTO group_membership (church_id, group_id, member_id, created_at) "
        "SELECT m.church_id, g.id, m.id, m.created_at FROM bench_member m "
        "JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM member_group "
        "      WHERE church_id = %(church)s) g ON g.k = m.rn %% 10 OR g.k = (m.rn / 7) %% 10 "
        "WHERE m.church_id = %(church)s ON CONFLICT DO NOTHING",
        params,
    )
    # The broadcasts: evenly spread with jitter; audiences of realistic sizes
    # (every 50th to everyone, every 10th to a big group, the rest small groups).
    conn.execute("DROP TABLE IF EXISTS bench_broadcast")
    conn.execute(
        "CREATE TEMP TABLE bench_broadcast AS "
        "SELECT n, ms, id, substr(replace(id::text, '-', ''), 1, 20) AS hex_20, k, "
        "       floor(random() * %(members)s)::int AS o "
        "FROM (SELECT n, ms, pg_temp.uuid7_at(ms) AS id, "
        "        least(%(members)s, CASE WHEN n %% 50 = 0 THEN %(members)s "
        "                 WHEN n %% 10 = 0 THEN greatest(1, %(members)s / 10) "
        "                 ELSE 20 + floor(random() * greatest(1, %(members)s / 100))::int END) AS k "
        "      FROM (SELECT n, (%(start)s + (n - 1)::bigint * %(span)s / %(n)s "
        "                      + floor(random() * %(span)s / %(n)s))::bigint AS ms "
        "            FROM generate_series(1, %(n)s) n) t) b",
        params,
    )
    conn.execute(
        "INSERT INTO message (church_id, id, created_at, body, target, status, recipient_count, "
        "segments, encoding, from_number, materialized_at, completed_at) "
        "SELECT %(church)s, b.id, pg_temp.ts_of(b.ms), "
        "       'Bench broadcast ' || b.n || ': service times changed, see you Sunday!', "
        "       CASE WHEN b.k = %(members)s THEN jsonb_build_object('all', true) "
        "            ELSE jsonb_build_object('group_ids', jsonb_build_array(g.id)) END, "
        "       'completed', b.k, 1, 'GSM-7', c.phone_number, "
        "       pg_temp.ts_of(b.ms) + interval '150 milliseconds', "
        "       pg_temp.ts_of(b.ms) + (b.k / 500.0 + 30) * interval '1 second' "
        "FROM bench_broadcast b CROSS JOIN church c "
        "JOIN LATERAL (SELECT id FROM member_group WHERE church_id = %(church)s "
        "              ORDER BY id OFFSET b.n %% 10 LIMIT 1) g ON true "
        "WHERE c.id = %(church)s",
        params,
    )
    conn.commit()
    # Recipient rows one month at a time (progress, and smaller transactions).
    months = conn.execute(
        "SELECT DISTINCT date_trunc('month', pg_temp.ts_of(ms) AT TIME ZONE 'UTC') "
        "FROM bench_broadcast ORDER BY 1"
    ).fetchall()
    recipients = 0
    for (month,) in months:
        cur = conn.execute(
            "INSERT INTO message_recipient (church_id, message_id, id, created_at, member_id, "
            "status, provider_message_id, error_code, attempts, segments, updated_at) "
            "SELECT %(church)s, b.id, r.rid, pg_temp.ts_of(b.ms), m.id, r.status, "
            "       CASE WHEN r.status <> 'skipped' THEN r.rid::text END, "
            "       CASE r.status WHEN 'failed' THEN '40300' WHEN 'undelivered' THEN '30003' END, "
            "       CASE WHEN r.status = 'skipped' THEN 0 ELSE 1 END, 1, "
            "       pg_temp.ts_of(b.ms) + (2 + j / 600.0 + random() * 20) * interval '1 second' "
            "FROM bench_broadcast b "
            "CROSS JOIN LATERAL generate_series(1, b.k) j "
            "JOIN bench_member m ON m.church_id = %(church)s AND m.rn = (b.o + j) %% %(members)s "
            "CROSS JOIN LATERAL (SELECT (b.hex_20 || lpad(to_hex(j), 12, '0'))::uuid AS rid, "
            "   CASE WHEN NOT m.opted_in THEN 'skipped' "
            "        WHEN random() < 0.012 THEN 'failed' "
            "        WHEN random() < 0.025 THEN 'undelivered' "
            "        ELSE 'delivered' END AS status) r "
            "WHERE date_trunc('month', pg_temp.ts_of(b.ms) AT TIME ZONE 'UTC') = %(month)s",
            {**params, "month": month},
        )
        conn.commit()
        recipients += cur.rowcount
        say(
            f"{label}: {recipients:,} recipient rows ({month:%Y-%m} done, "
            f"{time.perf_counter() - began:.1f} s)"
        )
    # Conversations: one per member for a slice of the members, 1-10 messages each,
    # alternating inbound and outbound, the last one no later than now.
    conn.execute("DROP TABLE IF EXISTS bench_conversation")
    conn.execute(
        "CREATE TEMP TABLE bench_conversation AS "
        "SELECT pg_temp.uuid7_at(first_ms) AS id, member_id, first_ms, nmsg, c, "
        "       (60000 + floor(random() * least(3 * 86400000, (%(start)s + %(span)s - first_ms) / 10)))::bigint AS gap_ms "
        "FROM (SELECT c, m.id AS member_id, "
        "        1 + floor(random() * 10)::int AS nmsg, "
        "        (%(start)s + floor(random() * %(span)s * 0.9))::bigint AS first_ms "
        "      FROM generate_series(0, %(convs)s - 1) c "
        "      JOIN bench_member m ON m.church_id = %(church)s "
        "       AND m.rn = (c::bigint * %(members)s / %(convs)s)) t",
        {**params, "convs": min(conversations, members)},
    )
    conn.execute(
        "INSERT INTO conversation (church_id, id, member_id, status, unread_count, "
        "last_message_at, created_at) "
        "SELECT %(church)s, id, member_id, CASE WHEN c %% 3 = 0 THEN 'closed' ELSE 'open' END, "
        "       CASE WHEN nmsg %% 2 = 1 AND c %% 3 <> 0 THEN 1 + c %% 3 ELSE 0 END, "
        "       pg_temp.ts_of(first_ms + (nmsg - 1) * gap_ms), pg_temp.ts_of(first_ms) "
        "FROM bench_conversation",
        params,
    )
    cur = conn.execute(
        "INSERT INTO conversation_message (church_id, id, created_at, conversation_id, "
        "direction, body, status, provider_message_id) "
        "SELECT %(church)s, pg_temp.uuid7_at(ms), "
        "       pg_temp.ts_of(ms), c.id, "
        "       CASE WHEN i %% 2 = 0 THEN 'inbound' ELSE 'outbound' END, "
        "       CASE WHEN i %% 2 = 0 THEN 'Thanks, see you there! (' || i || ')' "
        "            ELSE 'You are welcome, God bless (' || i || ')' END, "
        "       CASE WHEN i %% 2 = 0 THEN 'received' ELSE 'delivered' END, "
        "       'conv-' || md5(c.id::text || i) "
        "FROM bench_conversation c CROSS JOIN LATERAL generate_series(0, c.nmsg - 1) i "
        "CROSS JOIN LATERAL (SELECT c.first_ms + i * c.gap_ms AS ms) t",
        params,
    )
    conversation_messages = cur.rowcount
    conn.commit()
    return recipients, conversation_messages, broadcasts


def seed(url: str, vault: PhoneVault, plan: SeedPlan) -> Seeded:
    began = time.perf_counter()
    now_ms = _now_ms()
    # History: the `months` months before this one, up to an hour ago.
    first = month_start(datetime.now(UTC).date())
    for _ in range(plan.months):
        first = month_start(first - timedelta(days=1))
    start_ms = int(datetime(first.year, first.month, 1, tzinfo=UTC).timestamp() * 1000) + DAY_MS
    end_ms = now_ms - 3_600_000
    churches: list[tuple[uuid.UUID, str, int, int, int]] = []
    with psycopg.connect(url) as conn:
        conn.execute(_FUNCTIONS)
        created = _create_partitions(conn, _months_between(first, datetime.now(UTC).date()))
        if created:
            say(f"created {len(created)} past-month partitions")
        specs = [("Bench REST", plan.members, plan.broadcasts, plan.conversations)] + [
            (
                f"Bench neighbour {i + 1}",
                plan.neighbour_members,
                plan.neighbour_broadcasts,
                plan.neighbour_conversations,
            )
            for i in range(plan.neighbours)
        ]
        for name, members, broadcasts, conversations in specs:
            joined_ms = start_ms - 30 * DAY_MS
            church_id = uuid7(joined_ms)
            conn.execute(
                "WITH c AS (INSERT INTO church (id, name, phone_number, created_at) "
                "VALUES (%s, %s, '+1555' || lpad(nextval('sending_number_seq')::text, 7, '0'), %s) "
                "RETURNING phone_number, id) "
                "INSERT INTO church_number_lookup (phone_number, church_id) SELECT * FROM c",
                (church_id, name, datetime.fromtimestamp(joined_ms / 1000, UTC)),
            )
            _copy_members(conn, vault, church_id, members, 201 + len(churches), joined_ms)
            churches.append((church_id, name, members, broadcasts, conversations))
        conn.commit()
        say(
            f"{sum(c[2] for c in churches):,} members in {len(churches)} churches "
            f"({time.perf_counter() - began:.1f} s)"
        )
        conn.execute(
            "CREATE TEMP TABLE bench_member AS SELECT church_id, id, opted_in, created_at, "
            "row_number() OVER (PARTITION BY church_id ORDER BY id) - 1 AS rn FROM member"
        )
        conn.execute("CREATE INDEX ON bench_member (church_id, rn)")
        conn.execute("ANALYZE bench_member")
        totals = [0, 0, 0]
        for church_id, name, members, broadcasts, conversations in churches:
            recipients, conv_messages, messages = _seed_church(
                conn,
                church_id,
                members=members,
                broadcasts=broadcasts,
                conversations=conversations,
                start_ms=start_ms,
                end_ms=end_ms,
                label=name,
            )
            totals[0] += recipients
            totals[1] += conv_messages
            totals[2] += messages
        main_church = churches[0][0]
        conv_count = conn.execute("SELECT count(*) FROM conversation").fetchone()
        key = asyncio.run(_make_key(url, main_church))
    say("VACUUM ANALYZE (statistics and visibility for the seeded tables)")
    with psycopg.connect(url, autocommit=True) as conn:
        for table in (
            "church", "member", "member_group", "group_membership", "message",
            "message_recipient", "conversation", "conversation_message", "api_key",
        ):  # fmt: skip
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
    seconds = time.perf_counter() - began
    say(f"seeded in {seconds:.1f} s")
    return Seeded(
        church_id=str(main_church),
        api_key=key,
        recipients=totals[0],
        messages=totals[2],
        conversations=int(conv_count[0]) if conv_count else 0,
        conversation_messages=totals[1],
        seconds=round(seconds, 1),
        plan=asdict(plan),
    )


async def _make_key(url: str, church_id: uuid.UUID) -> str:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        _, secret = await create_api_key(
            conn, church_id, name="bench rest", scopes=["read", "write"], created_by=None
        )
        await conn.commit()
    return secret


def load_or_seed(
    url: str, vault: PhoneVault, data_dir: Path, plan: SeedPlan, reseed: bool
) -> Seeded:
    """The seeded data of an earlier run when the cluster still holds it, else seed."""
    marker = data_dir / MARKER
    if marker.exists() and not reseed:
        try:
            seeded = msgspec.json.decode(marker.read_bytes(), type=Seeded)
        except msgspec.DecodeError:
            seeded = None
        if seeded is not None and seeded.version == SEED_VERSION:
            with psycopg.connect(url) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM church WHERE id = %s", (uuid.UUID(seeded.church_id),)
                ).fetchone()
            if row and row[0] == 1:
                say(
                    f"reusing the seeded database ({seeded.recipients:,} recipient rows, "
                    f"seeded in {seeded.seconds} s; --reseed to start over)"
                )
                return seeded
        say("the marker does not match the database: seeding again")
    if marker.exists():
        marker.unlink()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM church").fetchone()
    if row and row[0]:
        raise SystemExit(
            f"the database in {data_dir} already has churches but no bench marker; "
            "run with --reseed (which deletes that data folder) to start over"
        )
    seeded = seed(url, vault, plan)
    marker.write_text(json.dumps(asdict(seeded), indent=2))
    marker.chmod(0o600)
    return seeded
