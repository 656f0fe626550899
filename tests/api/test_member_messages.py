"""The broadcasts a member received: ``GET /v1/members/{id}/messages`` (the inbox's
contact panel).

One church is seeded once through the real paths: three broadcasts to two groups
(one with a merge field, one sent after a member opted out) and a staff reply, all
sent through the simulator.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import psycopg
import pytest

from deploy.stack import Stack
from tests.conftest import Church, texted_in, unique_phone


class Seeded(msgspec.Struct):
    church: Church
    ada: str
    """In both groups; texted in and was answered; opted out before the third broadcast."""
    bob: str
    """In the choir only; the third broadcast never reached him (undelivered)."""
    nobody: str
    """In no group: received nothing."""
    broadcasts: list[str]
    """Ids of the three broadcasts, oldest first."""


@pytest.fixture(scope="module")
def seeded(base_url: str, sim_url: str) -> Iterator[Seeded]:
    church = Church(base_url)
    choir, youth = church.group("Choir"), church.group("Youth")
    ada, conversation = texted_in(church, sim_url, first_name="Ada", group_ids=[choir, youth])
    bob = church.member(unique_phone(), [choir], first_name="Bob")
    nobody = church.member(unique_phone(), first_name="Nobody")
    reply = church.api.post(f"/v1/conversations/{conversation}/messages", json={"body": "Hi Ada"})
    assert reply.status_code == 202, reply.text
    sent = [church.broadcast(choir, "Choir at 7"), church.broadcast(youth, "Hi {{first_name}}!")]
    for message, to in zip(sent, (2, 1), strict=True):

        def delivered(counts: dict[str, int], to: int = to) -> bool:
            return counts["delivered"] == to

        counts = church.counts_when(message, delivered)
        assert counts["delivered"] == to, counts
    assert church.api.post(f"/v1/members/{ada}/opt-out").status_code == 200
    _outcomes(sim_url, delivered=0.0, delivery_failed=1.0)
    try:
        sent.append(church.broadcast(choir, "Robes on Sunday"))
        counts = church.counts_when(sent[-1], lambda c: c["undelivered"] == 1)
    finally:
        _outcomes(sim_url, delivered=1.0, delivery_failed=0.0)
    assert counts["undelivered"] == 1, counts
    assert sum(counts.values()) == 1, counts
    yield Seeded(church, ada, bob, nobody, sent)
    church.close()


def _outcomes(sim_url: str, **shares: float) -> None:
    answer = httpx.post(f"{sim_url}/_sim/config", json={"outcomes": shares})
    assert answer.status_code == 200, answer.text


def _page(church: Church, member_id: str, **params: Any) -> tuple[list[dict[str, Any]], Any]:
    answer = church.api.get(f"/v1/members/{member_id}/messages", params=params)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body["data"], body["meta"]["next_cursor"]


def test_newest_first_with_the_members_status_and_the_body_as_written(seeded: Seeded) -> None:
    items, cursor = _page(seeded.church, seeded.ada)
    assert cursor is None
    # Not the third: she had opted out when it was accepted, so was no recipient.
    assert [i["message_id"] for i in items] == seeded.broadcasts[1::-1]
    assert [i["body"] for i in items] == ["Hi {{first_name}}!", "Choir at 7"]
    assert [i["status"] for i in items] == ["delivered", "delivered"]
    assert [i["error_code"] for i in items] == [None, None]
    assert all(i["updated_at"] > i["created_at"] for i in items)
    # The staff reply is a one-recipient message too: it is in the thread, not here.
    assert "Hi Ada" not in [i["body"] for i in items]

    items, _ = _page(seeded.church, seeded.bob)
    assert [i["message_id"] for i in items] == seeded.broadcasts[::-2]
    assert [i["body"] for i in items] == ["Robes on Sunday", "Choir at 7"]
    assert [i["status"] for i in items] == ["undelivered", "delivered"]
    assert items[0]["error_code"] is not None
    assert items[1]["error_code"] is None


def test_pages_follow_the_cursor_to_the_end(seeded: Seeded) -> None:
    first, cursor = _page(seeded.church, seeded.ada, limit=1)
    assert [i["body"] for i in first] == ["Hi {{first_name}}!"]
    assert cursor is not None
    second, cursor = _page(seeded.church, seeded.ada, limit=1, cursor=cursor)
    assert [i["body"] for i in second] == ["Choir at 7"]
    assert cursor is None
    bad = seeded.church.api.get(f"/v1/members/{seeded.ada}/messages", params={"cursor": "x!"})
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"]["code"] == "validation_error"
    over = seeded.church.api.get(f"/v1/members/{seeded.ada}/messages", params={"limit": 201})
    assert over.status_code == 422, over.text


def test_a_member_who_received_nothing_has_an_empty_list(seeded: Seeded) -> None:
    assert _page(seeded.church, seeded.nobody) == ([], None)


def test_another_churchs_member_and_an_unknown_id_are_not_found(
    seeded: Seeded, other_church: Church
) -> None:
    for church, member in (
        (other_church, seeded.ada),
        (seeded.church, "0190f0d2-7a39-7c3e-8f00-2b1c3d4e5f60"),
    ):
        answer = church.api.get(f"/v1/members/{member}/messages")
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["code"] == "not_found"
    # The session of staff reads it too (the inbox page does).
    assert seeded.church.session.get(f"/v1/members/{seeded.bob}/messages").status_code == 200


def test_the_list_reads_the_members_index(seeded: Seeded, stack: Stack) -> None:
    """Through message_recipient_member (migration 0016), not a scan of the church's
    recipients: the planner is told scans cost too much, so that on these few rows
    it still shows which index serves the query."""
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        plan = conn.execute(
            "EXPLAIN SELECT message_id FROM message_recipient WHERE church_id = %s "
            "AND member_id = %s ORDER BY created_at DESC, message_id DESC LIMIT 10",
            (seeded.church.id, seeded.ada),
        ).fetchall()
        # Each partition has its own index, attached to the parent's.
        attached = conn.execute(
            "SELECT relid::regclass::text FROM pg_partition_tree('message_recipient_member') "
            "WHERE isleaf"
        ).fetchall()
    text = "\n".join(str(row[0]) for row in plan)
    names = {str(row[0]) for row in attached}
    assert names, "message_recipient_member is on no partition"
    used = set(re.findall(r"Index (?:Only )?Scan (?:Backward )?using (\S+)", text))
    assert used, text
    assert used <= names, text
