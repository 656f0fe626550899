"""Queries by id name their partition: Postgres prunes to one of them."""

from __future__ import annotations

import re

import psycopg

from deploy.stack import Stack
from storage.domain.ids import created_at_of, uuid7


def _plan(stack: Stack, sql: str, params: tuple[object, ...]) -> str:
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        rows = conn.execute(f"EXPLAIN {sql}", params).fetchall()
    return "\n".join(r[0] for r in rows)


def _partitions(plan: str, table: str) -> set[str]:
    return set(re.findall(rf"\b{table}_y\d{{4}}m\d{{2}}(?![_\w])", plan))


def test_message_lookup_by_id_scans_one_partition(stack: Stack) -> None:
    message_id = uuid7()
    plan = _plan(
        stack,
        "SELECT * FROM message WHERE church_id = %s AND id = %s AND created_at = %s",
        (uuid7(), message_id, created_at_of(message_id)),
    )
    month = created_at_of(message_id)
    assert _partitions(plan, "message") == {f"message_y{month.year:04d}m{month.month:02d}"}, plan


def test_recipients_of_a_message_scan_one_partition(stack: Stack) -> None:
    message_id = uuid7()
    plan = _plan(
        stack,
        "SELECT status, count(*) FROM message_recipient WHERE church_id = %s "
        "AND message_id = %s AND created_at = %s GROUP BY status",
        (uuid7(), message_id, created_at_of(message_id)),
    )
    assert len(_partitions(plan, "message_recipient")) == 1, plan


def test_without_the_time_every_partition_is_probed(stack: Stack) -> None:
    """The counter-example that shows the pruning above is real."""
    plan = _plan(stack, "SELECT * FROM message WHERE id = %s", (uuid7(),))
    assert len(_partitions(plan, "message")) >= 4, plan


def test_migrate_made_this_month_and_the_next_three(stack: Stack) -> None:
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        names = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'message_recipient'"
            ).fetchall()
        }
    assert len(names) >= 4, names
