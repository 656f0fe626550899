"""The schema is Citus-ready, proven on the live, migrated schema (no Citus needed).

Citus enforces a unique constraint only inside one shard and a foreign key only
between colocated rows. So, reading the catalogs of the session stack's Postgres:
every table (partitioned parents included; partitions follow their parent) is
either a reference table listed in deploy/citus.sql, or is distributed there by
church with church_id (``church``: its id) first in its primary key and in every
unique index, and every foreign key between distributed tables includes that column
on both sides. deploy/citus.sql names every table exactly once, and its reference
tables are few, lookup-shaped and each given a reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import psycopg

from deploy.stack import Stack

CITUS_SQL = Path(__file__).resolve().parents[3] / "deploy" / "citus.sql"

MAX_REFERENCE_TABLES = 5
"""Reference tables are copied to every node and every write reaches every node:
a handful of lookups, not a place for data that grows with traffic."""
MAX_REFERENCE_COLUMNS = 4
"""A lookup is a key and what it points at; a wider table is data, to be keyed by church."""
HOT_TABLES = ("provider_event", "event_log", "message_recipient", "message", "audit_log")
"""Written on every text or every change: never reference tables."""


class Plan(NamedTuple):
    reference: list[str]
    distributed: dict[str, tuple[str, str | None]]
    """table -> (distribution column, colocate_with)"""
    every: list[str]
    """Every table named, in file order (for the exactly-once check)."""
    unexplained: list[str]
    """Reference tables without a reason comment right above them."""


_REFERENCE = re.compile(r"^SELECT create_reference_table\('(\w+)'\);$")
_DISTRIBUTED = re.compile(
    r"^SELECT create_distributed_table\('(\w+)', '(\w+)'(?:, colocate_with => '(\w+)')?\);$"
)


def read_plan(text: str) -> Plan:
    reference: list[str] = []
    distributed: dict[str, tuple[str, str | None]] = {}
    every: list[str] = []
    unexplained: list[str] = []
    previous = ""
    for raw in text.splitlines():
        line = raw.strip()
        if match := _REFERENCE.match(line):
            reference.append(match[1])
            every.append(match[1])
            if not previous.startswith("--"):
                unexplained.append(match[1])
        elif match := _DISTRIBUTED.match(line):
            distributed[match[1]] = (match[2], match[3])
            every.append(match[1])
        elif "create_" in line and not line.startswith("--"):
            raise AssertionError(f"deploy/citus.sql: a statement this test cannot read: {line}")
        if line:
            previous = line
    return Plan(reference, distributed, every, unexplained)


def _tables(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = %s::regnamespace "
        "AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
        (schema,),
    ).fetchall()
    return {str(r[0]) for r in rows}


def schema_problems(
    conn: psycopg.Connection[tuple[object, ...]],
    schema: str,
    reference: set[str],
    distributed: dict[str, str],
) -> list[str]:
    """What keeps ``schema`` from being distributed as planned (table -> column for
    the distributed ones); empty when nothing does."""
    problems: list[str] = []
    tables = _tables(conn, schema)
    for table in sorted(tables - reference - set(distributed)):
        problems.append(f"{table}: neither a reference table nor distributed")
    for table, column in sorted(distributed.items()):
        if table not in tables:
            continue
        found = conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s "
            "AND NOT attisdropped",
            (f"{schema}.{table}", column),
        ).fetchone()
        if found is None:
            problems.append(f"{table}: no column {column}")
    # Unique indexes (primary keys and unique constraints are backed by one) of the
    # distributed tables, parents only: a partition's follow its parent's.
    rows = conn.execute(
        "SELECT t.relname, i.relname, ix.indisprimary, a.attname "
        "FROM pg_index ix JOIN pg_class i ON i.oid = ix.indexrelid "
        "JOIN pg_class t ON t.oid = ix.indrelid "
        "LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ix.indkey[0] "
        "WHERE ix.indisunique AND t.relnamespace = %s::regnamespace "
        "AND NOT t.relispartition AND t.relkind IN ('r', 'p')",
        (schema,),
    ).fetchall()
    keyed = set()
    for table, index, primary, first in rows:
        column = distributed.get(str(table))
        if column is None:
            continue
        if primary:
            keyed.add(str(table))
        if first != column:
            what = "primary key" if primary else "unique index"
            problems.append(
                f"{table}: {what} {index} starts with {first or 'an expression'}, not {column}"
            )
    for table in sorted(set(distributed) & tables - keyed):
        problems.append(f"{table}: no primary key")
    # Foreign keys of parents (a partition's are copies: conparentid <> 0), with their
    # columns in key order on both sides.
    rows = conn.execute(
        "SELECT c.conname, t.relname, r.relname, "
        "  array(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, o) "
        "        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o), "
        "  array(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, o) "
        "        JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o) "
        "FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
        "JOIN pg_class r ON r.oid = c.confrelid "
        "WHERE c.contype = 'f' AND c.conparentid = 0 AND t.relnamespace = %s::regnamespace "
        "AND NOT t.relispartition",
        (schema,),
    ).fetchall()
    for name, table, target, columns, target_columns in rows:
        source_column = distributed.get(str(table))
        target_column = distributed.get(str(target))
        if source_column is None:
            if target_column is not None:
                problems.append(f"{table}: {name} refers from a reference table to {target}")
            continue
        if target_column is None:
            continue  # distributed -> reference: allowed
        pairs = list(zip(columns, target_columns, strict=True))
        if (source_column, target_column) not in pairs:
            problems.append(
                f"{table}: {name} -> {target} does not pair {source_column} with {target_column}"
            )
    return problems


def _plan() -> Plan:
    return read_plan(CITUS_SQL.read_text())


def test_citus_sql_names_every_table_exactly_once(stack: Stack) -> None:
    plan = _plan()
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        tables = _tables(conn, "public")
    doubled = sorted({t for t in plan.every if plan.every.count(t) > 1})
    assert not doubled, f"named more than once in deploy/citus.sql: {doubled}"
    assert sorted(tables - set(plan.every)) == [], "tables deploy/citus.sql does not name"
    assert sorted(set(plan.every) - tables) == [], "deploy/citus.sql names tables that do not exist"


def test_church_is_distributed_by_its_id_and_the_rest_by_church_colocated() -> None:
    plan = _plan()
    assert plan.distributed["church"] == ("id", None)
    others = {t: d for t, d in plan.distributed.items() if t != "church"}
    assert others
    assert all(d == ("church_id", "church") for d in others.values()), others


def test_the_live_schema_keeps_the_rules_of_citus(stack: Stack) -> None:
    plan = _plan()
    columns = {table: column for table, (column, _) in plan.distributed.items()}
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        problems = schema_problems(conn, "public", set(plan.reference), columns)
    assert problems == []


def test_reference_tables_are_few_small_lookups_with_a_reason(stack: Stack) -> None:
    plan = _plan()
    assert plan.unexplained == [], "reference tables need a comment saying why, right above"
    assert len(plan.reference) <= MAX_REFERENCE_TABLES, plan.reference
    assert not set(HOT_TABLES) & set(plan.reference)
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT c.relname, count(*) FROM pg_class c JOIN pg_attribute a "
            "ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY(%s) "
            "GROUP BY c.relname",
            (plan.reference,),
        ).fetchall()
    wide = {str(name): int(n) for name, n in rows if int(n) > MAX_REFERENCE_COLUMNS}
    assert wide == {}, "reference tables wider than a lookup"


def test_the_check_finds_what_citus_would_refuse(stack: Stack) -> None:
    """The counter-example: a scratch schema with each kind of fault is reported in
    full, so the empty list above means something."""
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        conn.execute("CREATE SCHEMA citus_faults")
        try:
            conn.execute(
                "CREATE TABLE citus_faults.church (id uuid PRIMARY KEY, phone text UNIQUE);"
                "CREATE TABLE citus_faults.lookup (k text PRIMARY KEY, church_id uuid "
                "  REFERENCES citus_faults.church (id));"
                "CREATE TABLE citus_faults.item (church_id uuid, id uuid, email text, "
                "  owner uuid, PRIMARY KEY (id, church_id));"
                "CREATE UNIQUE INDEX item_email ON citus_faults.item (lower(email));"
                "CREATE TABLE citus_faults.part (church_id uuid, id uuid, at timestamptz, "
                "  item_id uuid, PRIMARY KEY (church_id, id, at), "
                "  FOREIGN KEY (item_id, church_id) REFERENCES citus_faults.item (id, church_id)"
                ") PARTITION BY RANGE (at);"
                "CREATE TABLE citus_faults.part_1 PARTITION OF citus_faults.part "
                "  FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');"
                "CREATE TABLE citus_faults.nokey (church_id uuid);"
                "CREATE TABLE citus_faults.other (church_id uuid, id uuid, church_ref uuid "
                "  REFERENCES citus_faults.church (id), PRIMARY KEY (church_id, id));"
                "CREATE TABLE citus_faults.stray (id int PRIMARY KEY);"
            )
            problems = schema_problems(
                conn,
                "citus_faults",
                {"lookup"},
                {
                    "church": "id",
                    "item": "church_id",
                    "part": "church_id",
                    "nokey": "church_id",
                    "other": "church_id",
                },
            )
        finally:
            conn.rollback()
    assert sorted(problems) == sorted(
        [
            "church: unique index church_phone_key starts with phone, not id",
            "item: primary key item_pkey starts with id, not church_id",
            "item: unique index item_email starts with an expression, not church_id",
            "lookup: lookup_church_id_fkey refers from a reference table to church",
            "nokey: no primary key",
            "other: other_church_ref_fkey -> church does not pair church_id with id",
            "stray: neither a reference table nor distributed",
        ]
    ), problems
