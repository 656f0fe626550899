"""Archive file format candidates: bytes per row, write and read times, CPU.

One church's month in memory, shaped as ``storage/pg/demo.py`` writes history (its
texts, status mix, recipient ids ``recipient_id(message, n)``, a staff reply as a
one-recipient message sharing its conversation message's id), with every column
the migrations give the three archived tables (storage/archive/schema.py), each
written as one file per table by:

    parquet       pyarrow, zstd, rows sorted by the table's key (message_id, id for
                  recipients), row groups of --row-group rows; uuids as 16-byte
                  fixed binary, timestamps as UTC microseconds, jsonb as text
    ndjson+zstd   a header line (table, schema_version, columns) then one JSON
                  object per row, msgspec-encoded, sorted the same way, one zstd
                  frame (``backports.zstd``, the standard library's ``compression.zstd``); read back with msgspec into typed
                  Structs (uuid, datetime, dict values)
    format.py     storage/archive/format.py as built (the chosen format)

Reads: the whole church-month (every table, to Python rows); one message's
recipients (the page ``GET /v1/messages/{id}/recipients`` needs from a file not
yet cached): parquet reads only the row groups whose message_id statistics cover
it; ndjson decompresses the file and decodes only the lines that name it.
"CPU" is this process's CPU time for the same work, best of --reps.

Postgres sizes are an estimate from the columns' types and Postgres' tuple layout
(24-byte header with null bitmap, alignment, 4-byte line pointer, 8 kB pages,
primary key and secondary btree indexes at 90 % leaf fill); ``pg_column_size``
needs a database, and bench/archive.py measures the real ones.

    uv run --group bench nice -n 19 python bench/archive_format.py
    uv run --group bench nice -n 19 python bench/archive_format.py --members 2000 --broadcasts 15 --reps 5

pyarrow is in the bench dependency group only (it lost; see bench/README.md
"Archive format"). Numbers only; it checks every read returned what was written.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from storage.archive import format as archive_format  # noqa: E402
from storage.archive.format import zstd  # noqa: E402
from storage.archive.schema import COLUMNS, ROW_TYPES, SCHEMA_VERSION, SORT_KEYS, TABLES, Table  # noqa: E402
from storage.domain.ids import uuid7  # noqa: E402
from storage.domain.segments import count_segments  # noqa: E402
from storage.pg.demo import _FOR_GROUP, _INBOUND, _REPLIES, _WEEKLY  # noqa: E402
from storage.pg.recipients import recipient_id  # noqa: E402

Row = dict[str, Any]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- one church's month ------------------------------------------------------------


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _id_at(at: datetime) -> tuple[uuid.UUID, datetime]:
    ms = _ms(at)
    return uuid7(ms), datetime.fromtimestamp(ms / 1000, UTC)


def _outcome(rng: random.Random, landline: bool) -> tuple[str, str | None, float, int]:
    # storage/pg/demo.py's mix: landlines fail, 2.5 % undelivered, 0.5 % fail after retries.
    if landline:
        return "failed", "40001", rng.uniform(0.2, 2), 1
    roll = rng.random()
    if roll < 0.025:
        return "undelivered", rng.choice(("40008", "40006", "40002")), rng.uniform(5, 120), 1
    if roll < 0.03:
        return "failed", "40006", rng.uniform(30, 600), 3
    return "delivered", None, rng.uniform(1.5, 25), 1


def church_month(
    *, members: int, broadcasts: int, conversation_messages: int, seed: int
) -> dict[str, list[Row]]:
    rng = random.Random(seed)
    start = datetime(2024, 3, 1, tzinfo=UTC)
    church_id, owner_id = uuid.uuid4(), uuid7(_ms(start - timedelta(days=400)))
    number = "+15550001234"
    people = [
        (uuid7(_ms(start - timedelta(days=rng.uniform(30, 700)))), rng.random() < 0.015)
        for _ in range(members)
    ]
    people.sort(key=lambda p: p[0])
    groups = [uuid7(_ms(start - timedelta(days=800))) for _ in range(8)]
    message: list[Row] = []
    recipient: list[Row] = []
    thread: list[Row] = []

    def add_message(at: datetime, mid: uuid.UUID, body: str, target: Any, **extra: Any) -> None:
        info = count_segments(body)
        row: Row = {c.name: None for c in COLUMNS["message"]}
        row.update(
            church_id=church_id,
            id=mid,
            created_at=at,
            body=body,
            target=target,
            status="completed",
            recipient_count=1,
            segments=info.segments,
            encoding=info.encoding,
            from_number=number,
            created_by=owner_id,
            materialized_at=at + timedelta(milliseconds=300),
            kind="broadcast",
            consent_exempt=False,
            traceparent=f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
        )
        row.update(extra)
        message.append(row)

    def add_recipient(mid: uuid.UUID, at: datetime, n: int, member: uuid.UUID, lan: bool) -> Row:
        status, error, delay, attempts = _outcome(rng, lan)
        rid = recipient_id(mid, n)
        row: Row = {
            "church_id": church_id,
            "message_id": mid,
            "id": rid,
            "created_at": at,
            "member_id": member,
            "status": status,
            "provider_message_id": None if status == "failed" else f"sim-{rid}",
            "error_code": error,
            "attempts": attempts,
            "segments": 1,
            "updated_at": at + timedelta(seconds=1 + n * 0.02 + delay),
            "not_before": None,
        }
        recipient.append(row)
        return row

    for b in range(broadcasts):
        at = start + timedelta(days=b * 29.0 / broadcasts, hours=rng.randint(13, 20))
        mid, at = _id_at(at)
        everyone = b % 4 == 0 or broadcasts <= 15
        body = (
            rng.choice(_WEEKLY).format(name="Okafor")
            if everyone
            else rng.choice([t for texts in _FOR_GROUP.values() for t in texts])
        )
        audience = [p for p in people if everyone or rng.random() < 0.15]
        audience = [p for p in audience if rng.random() > 0.03]  # opted out
        last = at
        for n, (member, lan) in enumerate(audience, 1):
            last = max(last, add_recipient(mid, at, n, member, lan)["updated_at"])
        target = {"all": True} if everyone else {"group_ids": [str(rng.choice(groups))]}
        add_message(at, mid, body, target, recipient_count=len(audience), completed_at=last)

    talkers = rng.sample(people, min(len(people), max(1, conversation_messages // 5)))
    while len(thread) < conversation_messages:
        member, lan = rng.choice(talkers)
        at = start + timedelta(days=rng.uniform(0, 29))
        conversation_id = uuid7(_ms(at - timedelta(days=rng.uniform(0, 300))))
        for _ in range(rng.randint(2, 8)):
            tid, at = _id_at(at)
            if rng.random() < 0.55:
                thread.append(
                    {
                        "church_id": church_id,
                        "id": tid,
                        "created_at": at,
                        "conversation_id": conversation_id,
                        "direction": "inbound",
                        "body": rng.choice(_INBOUND),
                        "media": [],
                        "status": "received",
                        "provider_message_id": str(uuid7(_ms(at))),
                        "sent_by": None,
                    }
                )
            else:
                body = rng.choice(_REPLIES)
                r = add_recipient(tid, at, 1, member, lan)
                add_message(
                    at,
                    tid,
                    body,
                    {"member_ids": [str(member)]},
                    kind="reply",
                    conversation_id=conversation_id,
                    completed_at=r["updated_at"],
                )
                thread.append(
                    {
                        "church_id": church_id,
                        "id": tid,
                        "created_at": at,
                        "conversation_id": conversation_id,
                        "direction": "outbound",
                        "body": body,
                        "media": [],
                        "status": r["status"],
                        "provider_message_id": r["provider_message_id"],
                        "sent_by": owner_id,
                    }
                )
            at += timedelta(minutes=rng.uniform(1, 240))
    return {"message": message, "message_recipient": recipient, "conversation_message": thread}


def sort_rows(table: Table, rows: list[Row]) -> list[Row]:
    keys = SORT_KEYS[table]
    return sorted(rows, key=lambda r: tuple(r[k] for k in keys))


# -- the Postgres estimate --------------------------------------------------------

_ALIGN = {"uuid": 1, "timestamptz": 8, "bool": 1, "int": 4}
_WIDTH = {"uuid": 16, "timestamptz": 8, "bool": 1}
_INT2 = {("message_recipient", "attempts"), ("message_recipient", "segments")}


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _varlena(payload: int, offset: int) -> int:
    """Bytes a text/jsonb value of ``payload`` bytes takes at ``offset``: a 1-byte
    header (unaligned) up to 126 bytes, else a 4-byte header, int-aligned."""
    if payload <= 126:
        return offset + 1 + payload
    return _align(offset, 4) + 4 + payload


def pg_heap_bytes(table: Table, row: Row) -> int:
    cols = COLUMNS[table]
    has_null = any(row[c.name] is None for c in cols)
    header = _align(23 + (math.ceil(len(cols) / 8) if has_null else 0), 8)
    off = 0
    for c in cols:
        v = row[c.name]
        if v is None:
            continue
        if c.kind == "text":
            off = _varlena(len(v.encode()), off)
        elif c.kind == "jsonb":
            # jsonb's binary form is about its compact text plus a header per container.
            off = _varlena(len(json.dumps(v, separators=(",", ":"))) + 4, off)
        elif c.kind == "int" and (table, c.name) in _INT2:
            off = _align(off, 2) + 2
        else:
            off = _align(off, _ALIGN[c.kind]) + _WIDTH.get(c.kind, 4)
    return _align(header + off, 8) + 4  # + line pointer


def _btree(key_bytes: int) -> float:
    # 8-byte index tuple header, MAXALIGN, line pointer, 90 % leaf fill.
    return (_align(8 + key_bytes, 8) + 4) / 0.9


def pg_bytes(table: Table, rows: list[Row]) -> tuple[float, float]:
    """(heap bytes, index bytes) for ``rows`` in Postgres, per 8 kB page (24-byte page
    header) at fill factor 100."""
    heap = sum(pg_heap_bytes(table, r) for r in rows) * 8192 / 8168
    if table == "message_recipient":
        # PK (church_id, message_id, id, created_at); provider_message_id where not null.
        idx = len(rows) * _btree(56)
        idx += sum(
            _btree(1 + len(r["provider_message_id"])) for r in rows if r["provider_message_id"]
        )
    elif table == "message":
        # PK (church_id, id, created_at); (created_at) x2 partial (empty when archived);
        # message_broadcasts (church_id, created_at, id) where kind = 'broadcast'.
        idx = len(rows) * _btree(40)
        idx += sum(_btree(40) for r in rows if r["kind"] == "broadcast")
    else:
        # PK (church_id, id, created_at); thread (church_id, conversation_id, created_at, id).
        idx = len(rows) * (_btree(40) + _btree(56))
    return heap, idx


# -- candidate: parquet -----------------------------------------------------------


def _arrow_schema(pa: Any, table: Table) -> Any:
    types = {
        "uuid": pa.binary(16),
        "text": pa.string(),
        "timestamptz": pa.timestamp("us", tz="UTC"),
        "int": pa.int32(),
        "bool": pa.bool_(),
        "jsonb": pa.string(),
    }
    fields = [pa.field(c.name, types[c.kind], c.nullable) for c in COLUMNS[table]]
    meta = {"koinonia.table": table, "koinonia.schema_version": str(SCHEMA_VERSION)}
    return pa.schema(fields, metadata=meta)


def parquet_write(table: Table, rows: list[Row], *, level: int, row_group: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = COLUMNS[table]
    data: dict[str, list[Any]] = {}
    for c in cols:
        values = [r[c.name] for r in rows]
        if c.kind == "uuid":
            values = [None if v is None else v.bytes for v in values]
        elif c.kind == "jsonb":
            values = [json.dumps(v, separators=(",", ":")) for v in values]
        data[c.name] = values
    t = pa.Table.from_pydict(data, schema=_arrow_schema(pa, table))
    out = io.BytesIO()
    pq.write_table(t, out, compression="zstd", compression_level=level, row_group_size=row_group)
    return out.getvalue()


def _arrow_rows(table: Table, t: Any) -> list[Row]:
    rows: list[Row] = t.to_pylist()
    conv = [(c.name, c.kind) for c in COLUMNS[table] if c.kind in ("uuid", "jsonb")]
    for r in rows:
        for name, kind in conv:
            v = r[name]
            if v is not None:
                r[name] = uuid.UUID(bytes=v) if kind == "uuid" else json.loads(v)
    return rows


def parquet_read(table: Table, data: bytes) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return _arrow_rows(table, pq.read_table(pa.BufferReader(data)))


def parquet_arrow(table: Table, data: bytes) -> Any:
    """Decoded to an Arrow table only: what a reader that converts just the rows of
    the page it serves would pay up front."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data))


def parquet_recipients(data: bytes, message_id: uuid.UUID) -> list[Row]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    f = pq.ParquetFile(pa.BufferReader(data))
    key = message_id.bytes
    col = f.schema_arrow.get_field_index("message_id")
    groups = []
    for g in range(f.num_row_groups):
        st = f.metadata.row_group(g).column(col).statistics
        if st is None or not st.has_min_max or st.min <= key <= st.max:
            groups.append(g)
    t = f.read_row_groups(groups)
    t = t.filter(pc.equal(t["message_id"], pa.scalar(key, pa.binary(16))))
    return _arrow_rows("message_recipient", t)


# -- candidate: ndjson + zstd -------------------------------------------------------


STRUCTS = ROW_TYPES


def ndjson_write(table: Table, rows: list[Row], *, level: int) -> bytes:
    head = {
        "format": "koinonia-archive",
        "table": table,
        "schema_version": SCHEMA_VERSION,
        "columns": [msgspec.to_builtins(c) for c in COLUMNS[table]],
    }
    enc = msgspec.json.Encoder()
    buf = bytearray(enc.encode(head))
    buf += b"\n"
    for r in rows:
        enc.encode_into(r, buf, -1)
        buf += b"\n"
    return zstd.compress(bytes(buf), level)


def ndjson_read(table: Table, data: bytes) -> list[Any]:
    raw = zstd.decompress(data)
    body = raw[raw.index(b"\n") + 1 :]
    return msgspec.json.Decoder(STRUCTS[table]).decode_lines(body)


def ndjson_raw(table: Table, data: bytes) -> bytes:
    """Decompressed only."""
    return zstd.decompress(data)


def ndjson_recipients(data: bytes, message_id: uuid.UUID) -> list[Any]:
    raw = zstd.decompress(data)
    needle = b'"message_id":"' + str(message_id).encode() + b'"'
    dec = msgspec.json.Decoder(STRUCTS["message_recipient"])
    return [dec.decode(line) for line in raw.split(b"\n")[1:] if needle in line]


# -- measuring -----------------------------------------------------------------------


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, float, Any]:
    """(best wall ms, best CPU ms, last result) over ``reps`` runs."""
    best_wall = best_cpu = math.inf
    out = None
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        best_wall = min(best_wall, (time.perf_counter() - w) * 1000)
        best_cpu = min(best_cpu, (time.process_time() - c) * 1000)
    return best_wall, best_cpu, out


def _plain(v: Any) -> Any:
    return msgspec.to_builtins(v) if isinstance(v, msgspec.Struct) else v


def same(table: Table, a: list[Row], b: list[Any]) -> bool:
    names = [c.name for c in COLUMNS[table]]

    def get(r: Any, n: str) -> Any:
        return r[n] if isinstance(r, dict) else getattr(r, n)

    return len(a) == len(b) and all(
        get(x, n) == get(y, n) for x, y in zip(a, b, strict=True) for n in names
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--members", type=int, default=2000)
    p.add_argument("--broadcasts", type=int, default=15)
    p.add_argument("--conversation-messages", type=int, default=3000)
    p.add_argument("--reps", type=int, default=3, help="runs of each timing; the best is shown")
    p.add_argument(
        "--level",
        type=int,
        default=archive_format.LEVEL,
        help="zstd level of the parquet and ndjson+zstd candidates (format.py uses its own)",
    )
    p.add_argument(
        "--frame-rows",
        type=int,
        default=archive_format.FRAME_ROWS,
        help="format.py's rows per zstd frame (to compare; the module's constant otherwise)",
    )
    p.add_argument(
        "--format-level", type=int, default=archive_format.LEVEL, help="format.py's zstd level"
    )
    p.add_argument("--row-group", type=int, default=4096, help="parquet rows per row group")
    args = p.parse_args()
    if not (1 <= args.members <= 50_000 and 1 <= args.broadcasts <= 200 and 1 <= args.reps <= 20):
        p.error("members 1..50000, broadcasts 1..200, reps 1..20")
    try:
        import pyarrow
    except ImportError as e:
        sys.exit(f"bench/archive_format.py needs pyarrow: uv run --group bench ({e})")

    if args.frame_rows < 1 or not 1 <= args.format_level <= 22:
        p.error("--frame-rows at least 1, --format-level 1..22")
    # Module constants, set only here to compare frame sizes and levels.
    setattr(archive_format, "FRAME_ROWS", args.frame_rows)  # noqa: B010
    setattr(archive_format, "LEVEL", args.format_level)  # noqa: B010
    say(f"generating {args.members} members x {args.broadcasts} broadcasts ...")
    generated = church_month(
        members=args.members,
        broadcasts=args.broadcasts,
        conversation_messages=args.conversation_messages,
        seed=1,
    )
    month: dict[Table, list[Row]] = {t: sort_rows(t, generated[t]) for t in TABLES}
    counts = {t: len(month[t]) for t in TABLES}
    say("rows: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
    say(f"pyarrow {pyarrow.__version__}, zstd {zstd.zstd_version}, msgspec {msgspec.__version__}")
    level, row_group = args.level, args.row_group

    def w_parquet(t: Table, r: list[Row]) -> bytes:
        return parquet_write(t, r, level=level, row_group=row_group)

    def w_ndjson(t: Table, r: list[Row]) -> bytes:
        return ndjson_write(t, r, level=level)

    def w_format(t: Table, r: list[Row]) -> bytes:
        return archive_format.write_month(r, t).data

    def r_format(t: Table, d: bytes) -> list[Any]:
        return archive_format.read_month(d, t)

    def one_format(d: bytes, m: uuid.UUID) -> list[Any]:
        return archive_format.read_key(d, "message_recipient", m)

    writers: dict[str, Callable[[Table, list[Row]], bytes]] = {
        "parquet": w_parquet,
        "ndjson+zstd": w_ndjson,
        "format.py": w_format,
    }
    readers: dict[str, Callable[[Table, bytes], list[Any]]] = {
        "parquet": parquet_read,
        "ndjson+zstd": ndjson_read,
        "format.py": r_format,
    }
    one: dict[str, Callable[[bytes, uuid.UUID], list[Any]]] = {
        "parquet": parquet_recipients,
        "ndjson+zstd": ndjson_recipients,
        "format.py": one_format,
    }
    broadcast = max(month["message"], key=lambda r: r["recipient_count"])["id"]
    want = [r for r in month["message_recipient"] if r["message_id"] == broadcast]

    print(
        "\n| table | rows | Postgres est. heap B/row | + indexes B/row | "
        + " | ".join(f"{c} B/row" for c in writers)
        + " |"
    )
    print("|---|---:|---:|---:|" + "---:|" * len(writers))
    files: dict[str, dict[Table, bytes]] = {c: {} for c in writers}
    write_t: dict[str, list[float]] = {c: [0.0, 0.0] for c in writers}
    for t in TABLES:
        rows = month[t]
        for c, w in writers.items():
            wall, cpu, files[c][t] = timed(partial(w, t, rows), args.reps)
            write_t[c][0] += wall
            write_t[c][1] += cpu
        heap, idx = pg_bytes(t, rows)
        n = len(rows)
        sizes = " | ".join(f"{len(files[c][t]) / n:.1f}" for c in writers)
        print(f"| {t} | {n:,} | {heap / n:.0f} | {(heap + idx) / n:.0f} | {sizes} |")
    total_rows = sum(counts.values())
    pg_all = sum(sum(pg_bytes(t, month[t])) for t in TABLES)
    heap_only = sum(pg_bytes(t, month[t])[0] for t in TABLES)
    print(
        f"| all three | {total_rows:,} | {heap_only / total_rows:.0f} | {pg_all / total_rows:.0f} | "
        + " | ".join(f"{sum(len(b) for b in files[c].values()) / total_rows:.1f}" for c in writers)
        + " |"
    )
    print(
        "\nfile sizes (KiB): "
        + "; ".join(
            f"{c} " + ", ".join(f"{len(files[c][t]) / 1024:.0f}" for t in TABLES) for c in writers
        )
    )

    print(
        "\n| candidate | write ms | write CPU ms | read month ms | read CPU ms "
        f"| one broadcast's {len(want):,} recipients ms | its CPU ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in writers:

        def read_all(c: str = c) -> dict[Table, list[Any]]:
            return {t: readers[c](t, files[c][t]) for t in TABLES}

        rw, rc, got = timed(read_all, args.reps)
        for t in TABLES:
            if not same(t, month[t], got[t]):
                sys.exit(f"{c}: {t} did not read back as written")
        ow, oc, mine = timed(partial(one[c], files[c]["message_recipient"], broadcast), args.reps)
        if not same("message_recipient", want, mine):
            sys.exit(f"{c}: one broadcast's recipients did not read back")
        print(
            f"| {c} | {write_t[c][0]:.1f} | {write_t[c][1]:.1f} | {rw:.1f} | {rc:.1f} "
            f"| {ow:.1f} | {oc:.1f} |"
        )
    arrow = files["parquet"]
    raw = files["ndjson+zstd"]
    rw, rc, _ = timed(lambda: [parquet_arrow(t, arrow[t]) for t in TABLES], args.reps)
    print(f"| parquet, to Arrow only | | | {rw:.1f} | {rc:.1f} | | |")
    rw, rc, _ = timed(lambda: [ndjson_raw(t, raw[t]) for t in TABLES], args.reps)
    print(f"| ndjson+zstd, decompress only | | | {rw:.1f} | {rc:.1f} | | |")

    # The other archived read: one conversation's messages (the busiest one).
    by_conv: dict[uuid.UUID, int] = {}
    for r in month["conversation_message"]:
        by_conv[r["conversation_id"]] = by_conv.get(r["conversation_id"], 0) + 1
    conv = max(by_conv, key=lambda k: by_conv[k])
    cw, cc, got_conv = timed(
        partial(
            archive_format.read_key,
            files["format.py"]["conversation_message"],
            "conversation_message",
            conv,
        ),
        args.reps,
    )
    if len(got_conv) != by_conv[conv]:
        sys.exit("format.py: one conversation's messages did not read back")
    print(f"\nformat.py, one conversation's {by_conv[conv]} messages: {cw:.1f} ms, CPU {cc:.1f} ms")


if __name__ == "__main__":
    main()
