"""Canned replies: /v1/canned-replies, and replies sent from them.

docs/protocol.md "The inbox": create, list, change, delete; ``POST
/v1/conversations/{id}/messages`` takes ``{"canned_reply_id"}`` in place of
``body``, filled for the member with the templates' merge fields, and sent like
any reply (consent rules unchanged).
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg

from deploy.stack import Stack
from tests.conftest import Church, texted_in, texts_sent, unique_phone, wait_until

WELCOME = "Hi {{first_name}}, welcome to {{ church_name }}!"


def _canned(church: Church, name: str, body: str = WELCOME) -> dict[str, Any]:
    answer = church.api.post("/v1/canned-replies", json={"name": name, "body": body})
    assert answer.status_code == 201, answer.text
    made: dict[str, Any] = answer.json()["data"]
    return made


def _stored(stack: Stack, church: Church) -> list[tuple[Any, ...]]:
    """The church's canned replies as the database holds them."""
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        return conn.execute(
            "SELECT id, name, body, updated_at FROM canned_reply WHERE church_id = %s ORDER BY id",
            (uuid.UUID(church.id),),
        ).fetchall()


def _outbound(church: Church, conversation_id: str) -> list[dict[str, Any]]:
    thread = church.api.get(f"/v1/conversations/{conversation_id}/messages").json()["data"]
    return [m for m in thread if m["direction"] == "outbound"]


def _errors(answer: httpx.Response) -> tuple[int, str, list[str]]:
    error = answer.json()["error"]
    return answer.status_code, error["code"], [d["field"] for d in error.get("details") or []]


def test_create_list_change_delete(church: Church) -> None:
    made = _canned(church, "Welcome")
    assert (made["name"], made["body"]) == ("Welcome", WELCOME)
    assert made["merge_fields"] == ["church_name", "first_name"]
    others = [_canned(church, f"Answer {n}", "See you Sunday") for n in range(2)]
    first = church.api.get("/v1/canned-replies", params={"limit": 2}).json()
    assert [c["id"] for c in first["data"]] == [made["id"], others[0]["id"]]
    assert first["meta"]["next_cursor"]
    rest = church.api.get(
        "/v1/canned-replies", params={"limit": 2, "cursor": first["meta"]["next_cursor"]}
    ).json()
    assert ([c["id"] for c in rest["data"]], rest["meta"]["next_cursor"]) == (
        [others[1]["id"]],
        None,
    )
    changed = church.api.patch(
        f"/v1/canned-replies/{made['id']}", json={"body": "Bye {{last_name}}"}
    )
    assert changed.status_code == 200, changed.text
    data = changed.json()["data"]
    assert (data["name"], data["body"], data["merge_fields"]) == (
        "Welcome",
        "Bye {{last_name}}",
        ["last_name"],
    )
    renamed = church.api.patch(f"/v1/canned-replies/{made['id']}", json={"name": "Goodbye"})
    assert renamed.json()["data"]["name"] == "Goodbye"
    gone = church.api.delete(f"/v1/canned-replies/{made['id']}")
    assert gone.status_code == 200, gone.text
    assert gone.json()["data"] == {"id": made["id"], "deleted": True}
    listed = church.api.get("/v1/canned-replies").json()["data"]
    assert [c["id"] for c in listed] == [o["id"] for o in others]
    for answer in (
        church.api.delete(f"/v1/canned-replies/{made['id']}"),
        church.api.patch(f"/v1/canned-replies/{made['id']}", json={"name": "Back"}),
    ):
        assert _errors(answer)[:2] == (404, "not_found")


def test_bad_canned_replies_write_nothing(church: Church, stack: Stack) -> None:
    kept = _canned(church, "Directions", "We meet at 12 Main St")
    other = _canned(church, "Parking")
    before = _stored(stack, church)
    for body, fields in (
        ({"name": "Hi", "body": "Hi {{nickname}}"}, ["body"]),
        ({"name": "Hi", "body": "Hi {{first_name"}, ["body"]),
        ({"name": "Hi", "body": "{{nickname}} {{first_name"}, ["body", "body"]),
        ({"name": "   ", "body": "Hi"}, ["name"]),
        ({"name": "Hi"}, ["body"]),
        ({"name": "Hi", "body": ""}, ["body"]),
        ({"name": "Hi", "body": "x" * 1601}, ["body"]),
        ({"name": "Hi", "body": "Hi", "shortcut": "/hi"}, ["shortcut"]),
    ):
        answer = church.api.post("/v1/canned-replies", json=body)
        assert _errors(answer) == (422, "validation_error", fields), (body, answer.text)
    duplicate = church.api.post("/v1/canned-replies", json={"name": "DIRECTIONS", "body": "x"})
    assert _errors(duplicate)[:2] == (409, "conflict")
    path = f"/v1/canned-replies/{kept['id']}"
    for body in ({"body": "Hi {{nickname}}"}, {"name": ""}, {"name": "   "}, {"id": kept["id"]}):
        answer = church.api.patch(path, json=body)
        assert _errors(answer)[:2] == (422, "validation_error"), (body, answer.text)
    taken = church.api.patch(f"/v1/canned-replies/{other['id']}", json={"name": "directions"})
    assert _errors(taken)[:2] == (409, "conflict")
    assert _stored(stack, church) == before


def test_another_churchs_canned_reply_is_not_found(
    church: Church, other_church: Church, stack: Stack, sim_url: str
) -> None:
    theirs = _canned(other_church, "Theirs", "Hello {{first_name}}")
    stored = _stored(stack, other_church)
    for answer in (
        church.api.patch(f"/v1/canned-replies/{theirs['id']}", json={"name": "Mine now"}),
        church.api.delete(f"/v1/canned-replies/{theirs['id']}"),
    ):
        assert _errors(answer)[:2] == (404, "not_found")
    assert church.api.get("/v1/canned-replies").json()["data"] == []
    phone = unique_phone()
    _, conversation_id = texted_in(church, sim_url, phone)
    reply = church.api.post(
        f"/v1/conversations/{conversation_id}/messages", json={"canned_reply_id": theirs["id"]}
    )
    assert _errors(reply)[:2] == (404, "not_found")
    assert "Hello" not in reply.text
    assert _outbound(church, conversation_id) == []
    assert _stored(stack, other_church) == stored
    assert texts_sent(sim_url, [phone]) == [0]


def test_a_reply_from_a_canned_reply_is_filled_for_the_member(church: Church, sim_url: str) -> None:
    canned = _canned(church, "Welcome")
    phone = unique_phone()
    _, conversation_id = texted_in(church, sim_url, phone, first_name="Lydia")
    path = f"/v1/conversations/{conversation_id}/messages"
    for body in ({}, {"body": "Hi", "canned_reply_id": canned["id"]}):
        answer = church.api.post(path, json=body)
        assert _errors(answer) == (422, "validation_error", ["body", "canned_reply_id"]), body
    assert _errors(church.api.post(path, json={"canned_reply_id": "nope"}))[:2] == (
        422,
        "validation_error",
    )
    assert _outbound(church, conversation_id) == []
    answer = church.api.post(path, json={"canned_reply_id": canned["id"]})
    assert answer.status_code == 202, answer.text
    text = "Hi Lydia, welcome to Grace Chapel!"
    assert answer.json()["data"]["body"] == text
    sent: list[dict[str, Any]] = []

    def handed_over() -> bool:
        sent[:] = [m for m in _outbound(church, conversation_id) if m["provider_message_id"]]
        return bool(sent)

    wait_until(handed_over, 10, "the reply reached the provider")
    (message,) = sent
    assert message["body"] == text
    at_provider = httpx.get(
        f"{sim_url}/v2/messages/{message['provider_message_id']}",
        headers={"Authorization": "Bearer test"},
    )
    assert at_provider.status_code == 200, at_provider.text
    assert at_provider.json()["data"]["text"] == text
    assert texts_sent(sim_url, [phone]) == [1]
    # Consent rules as for any reply: an opted-out member is not texted.
    member_id = church.api.get(f"/v1/conversations/{conversation_id}").json()["data"]["member_id"]
    assert church.api.post(f"/v1/members/{member_id}/opt-out").status_code == 200
    refused = church.api.post(path, json={"canned_reply_id": canned["id"]})
    assert _errors(refused)[:2] == (409, "opted_out")
    assert len(_outbound(church, conversation_id)) == 1
