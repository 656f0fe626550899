"""Notes: staff's words kept in a conversation's thread, never texted.

``POST /v1/conversations/{id}/notes`` (docs/protocol.md "The inbox"): listed by the
thread with ``direction: "note"`` and ``author_id``, never unread, never reopening,
published as ``conversation.message.created``; kept by the archive like texts, and
blanked with them when the member is erased.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg

from deploy.stack import Stack
from storage.archive.format import read_key, write_month
from storage.archive.reader import _thread_message
from storage.archive.schema import ArchivedConversationMessage
from tests.conftest import Church, texted_in, texts_sent, unique_phone, wait_until


def _thread(church: Church, conversation_id: str) -> list[dict[str, Any]]:
    answer = church.api.get(f"/v1/conversations/{conversation_id}/messages")
    assert answer.status_code == 200, answer.text
    thread: list[dict[str, Any]] = answer.json()["data"]
    return thread


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event of an SSE stream."""
    name = ""
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))


def _rows(stack: Stack, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def test_a_note_is_listed_published_and_never_texted_nor_unread(
    church: Church, stack: Stack, base_url: str, sim_url: str
) -> None:
    phone = unique_phone()
    _, conversation_id = texted_in(church, sim_url, phone)
    before = church.api.get(f"/v1/conversations/{conversation_id}").json()["data"]
    assert before["unread_count"] == 1
    channel = {"channel": f"conversation:{conversation_id}"}
    auth = {"Authorization": f"Bearer {church.key}"}
    with (
        httpx.Client(base_url=base_url, timeout=10.0) as client,
        client.stream("GET", "/v1/events", params=channel, headers=auth) as stream,
    ):
        assert stream.status_code == 200
        events = _sse(stream.iter_lines())
        assert next(events)[0] == "ready"
        # A staff session writes one note, an integrator's API key another.
        by_staff = church.session.post(
            f"/v1/conversations/{conversation_id}/notes", json={"body": "Called her: Sunday"}
        )
        assert by_staff.status_code == 201, by_staff.text
        by_key = church.api.post(
            f"/v1/conversations/{conversation_id}/notes", json={"body": "Synced from the CRM"}
        )
        assert by_key.status_code == 201, by_key.text
        published: list[dict[str, Any]] = []
        for name, frame in events:
            if name == "conversation.message.created":
                published.append(frame["event"]["data"])
            if len(published) == 2:
                break
    staff_note, key_note = by_staff.json()["data"], by_key.json()["data"]
    assert (staff_note["direction"], staff_note["author_id"]) == ("note", church.user_id)
    assert (key_note["direction"], key_note["author_id"]) == ("note", None)
    assert [(e["message_id"], e["direction"], e["body"]) for e in published] == [
        (staff_note["id"], "note", "Called her: Sunday"),
        (key_note["id"], "note", "Synced from the CRM"),
    ]
    thread = _thread(church, conversation_id)
    assert [(m["id"], m["direction"], m["author_id"]) for m in thread] == [
        (key_note["id"], "note", None),
        (staff_note["id"], "note", church.user_id),
        (thread[2]["id"], "inbound", None),
    ]
    # Not unread, not the latest activity; and no text was made of either note.
    after = church.api.get(f"/v1/conversations/{conversation_id}").json()["data"]
    assert (after["unread_count"], after["last_message_at"]) == (1, before["last_message_at"])
    notes = [uuid.UUID(staff_note["id"]), uuid.UUID(key_note["id"])]
    assert _rows(stack, "SELECT id FROM message WHERE id = ANY(%s)", notes) == []
    # A reply after them is texted: by the time it arrives, a texted note would have too.
    reply = church.api.post(f"/v1/conversations/{conversation_id}/messages", json={"body": "Ok"})
    assert reply.status_code == 202, reply.text
    wait_until(lambda: texts_sent(sim_url, [phone]) == [1], 10, "the reply was texted")
    assert texts_sent(sim_url, [phone]) == [1]


def test_a_note_needs_no_consent_does_not_reopen_and_is_erased_with_the_member(
    church: Church, sim_url: str
) -> None:
    member_id, conversation_id = texted_in(church, sim_url, unique_phone())
    closed = church.api.patch(f"/v1/conversations/{conversation_id}", json={"status": "closed"})
    assert closed.status_code == 200, closed.text
    # Never texted, so consent does not come into it.
    assert church.api.post(f"/v1/members/{member_id}/opt-out").status_code == 200
    note = church.api.post(
        f"/v1/conversations/{conversation_id}/notes", json={"body": "Her mother is ill"}
    )
    assert note.status_code == 201, note.text
    assert church.api.get(f"/v1/conversations/{conversation_id}").json()["data"]["status"] == (
        "closed"
    )
    assert church.api.delete(f"/v1/members/{member_id}").status_code == 200
    assert [(m["direction"], m["body"]) for m in _thread(church, conversation_id)] == [
        ("note", ""),
        ("inbound", ""),
    ]
    # Erasure blanked their conversation: it takes no new text about them.
    again = church.api.post(
        f"/v1/conversations/{conversation_id}/notes", json={"body": "She moved to Leeds"}
    )
    assert (again.status_code, again.json()["error"]["code"]) == (409, "conflict")
    assert len(_thread(church, conversation_id)) == 2


def test_bad_notes_and_another_churchs_conversation_write_nothing(
    church: Church, other_church: Church, stack: Stack, sim_url: str
) -> None:
    _, conversation_id = texted_in(church, sim_url, unique_phone())
    path = f"/v1/conversations/{conversation_id}/notes"
    for body, field in (
        ({}, "body"),
        ({"body": ""}, "body"),
        ({"body": "x" * 1601}, "body"),
        ({"body": 7}, "body"),
        ({"body": "ok", "author_id": church.user_id}, "author_id"),
    ):
        answer = church.api.post(path, json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["error"]["code"] == "validation_error"
        assert [d["field"] for d in answer.json()["error"]["details"]] == [field], body
    stranger = other_church.api.post(path, json={"body": "Not yours"})
    assert (stranger.status_code, stranger.json()["error"]["code"]) == (404, "not_found")
    unknown = church.api.post(f"/v1/conversations/{uuid.uuid4()}/notes", json={"body": "Hm"})
    assert unknown.status_code == 404
    written = _rows(
        stack,
        "SELECT direction FROM conversation_message WHERE church_id = ANY(%s)",
        [uuid.UUID(church.id), uuid.UUID(other_church.id)],
    )
    assert written == [("inbound",)]


def test_the_archive_keeps_a_notes_author() -> None:
    """A note's row as the archiver writes it reads back into the thread with its
    author (the live months' side is the test above)."""
    church_id, conversation_id, author = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    row = {
        "church_id": church_id,
        "id": uuid.uuid4(),
        "created_at": datetime(2025, 1, 5, 10, tzinfo=UTC),
        "conversation_id": conversation_id,
        "direction": "note",
        "body": "Prayer request: her knee",
        "media": [],
        "status": "saved",
        "provider_message_id": None,
        "sent_by": None,
        "author_id": author,
    }
    data = write_month([row], "conversation_message").data
    (stored,) = read_key(data, "conversation_message", conversation_id)
    assert isinstance(stored, ArchivedConversationMessage)
    kept = _thread_message(stored, erased=False)
    assert (kept.direction, kept.author_id, kept.archived) == ("note", author, True)
    assert _thread_message(stored, erased=True).body == ""
