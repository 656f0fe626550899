"""Broadcasts beyond the minimum flow: scheduling, cancel, templates and merge fields,
validation, tenancy."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import psycopg

from deploy.stack import Stack
from tests.conftest import Church, receipt_ref, texts_sent, unique_phone


def _soon(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def _status_when(church: Church, message_id: str, wanted: str, seconds: float = 20) -> str:
    deadline = time.monotonic() + seconds
    while True:
        status: str = church.api.get(f"/v1/messages/{message_id}").json()["data"]["status"]
        if status == wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def make_template(church: Church, stack: Stack, body: str) -> str:
    """A template of ``church``: through the API when it is wired, else straight in
    the table (the templates API is another module's)."""
    answer = church.api.post(
        "/v1/templates", json={"name": f"t-{uuid.uuid4().hex[:8]}", "body": body}
    )
    if answer.status_code == 201:
        return str(answer.json()["data"]["id"])
    template_id = uuid.uuid4()
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        conn.execute(
            "INSERT INTO message_template (church_id, id, name, body) VALUES (%s, %s, %s, %s)",
            (church.id, template_id, f"t-{template_id.hex[:8]}", body),
        )
    return str(template_id)


def sent_text_was(
    stack: Stack,
    sim_url: str,
    church: Church,
    message_id: str,
    recipient: dict[str, Any],
    phone: str,
    text: str,
) -> int:
    """Ask the simulator whether this recipient's text was ``text``: it replays a send
    whose Idempotency-Key and body match the first (200, the same message id) and
    refuses the key with any other body (422). Nothing is sent either way."""
    body = {
        "from": church.phone_number,
        "to": phone,
        "text": text,
        "webhook_url": f"{stack.env['KOINONIA_PUBLIC_URL'].rstrip('/')}/v1/provider/telnyx/"
        f"webhooks?ref={receipt_ref(stack, church.id, message_id, recipient['id'])}",
        "use_profile_webhooks": False,
    }
    answer = httpx.post(
        f"{sim_url}/v2/messages",
        content=msgspec.json.encode(body),
        headers={
            "Authorization": "Bearer test",
            "Content-Type": "application/json",
            "Idempotency-Key": f"rcpt-{recipient['id']}",
        },
    )
    if answer.status_code == 200:
        assert answer.json()["data"]["id"] == recipient["provider_message_id"]
    return answer.status_code


def test_scheduled_message_goes_out_after_send_at(church: Church, sim_url: str) -> None:
    group = church.group()
    phones = [unique_phone() for _ in range(2)]
    for phone in phones:
        church.member(phone, [group])
    send_at = _soon(3)
    answer = church.api.post(
        "/v1/messages",
        json={"body": "Doors open at 9", "target": {"group_ids": [group]}, "send_at": send_at},
    )
    assert answer.status_code == 202, answer.text
    data = answer.json()["data"]
    assert data["status"] == "scheduled"
    assert data["recipient_count"] == 2
    assert data["segments"] == 1
    assert data["encoding"] == "GSM-7" or data["encoding"]
    message_id = data["id"]
    detail = church.api.get(f"/v1/messages/{message_id}").json()["data"]
    assert detail["status"] == "scheduled"
    assert detail["counts"]["queued"] == 2
    assert datetime.fromisoformat(detail["send_at"]) == datetime.fromisoformat(send_at)
    listed = church.api.get("/v1/messages", params={"status": "scheduled"}).json()["data"]
    assert [m["id"] for m in listed] == [message_id]
    assert texts_sent(sim_url, phones) == [0, 0]

    counts = church.counts_when(message_id, lambda c: c["delivered"] == 2, 20)
    assert counts["delivered"] == 2, counts
    assert texts_sent(sim_url, phones) == [1, 1]
    recipients = church.api.get(f"/v1/messages/{message_id}/recipients").json()["data"]
    for r in recipients:
        assert datetime.fromisoformat(r["updated_at"]) >= datetime.fromisoformat(send_at)
    assert church.api.get("/v1/messages", params={"status": "scheduled"}).json()["data"] == []
    again = church.api.post(f"/v1/messages/{message_id}/cancel")
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "conflict"


def test_canceled_before_send_at_is_never_sent(church: Church, sim_url: str) -> None:
    group = church.group()
    phone = unique_phone()
    church.member(phone, [group])
    answer = church.api.post(
        "/v1/messages",
        json={"body": "Never mind", "target": {"group_ids": [group]}, "send_at": _soon(2)},
    )
    message_id = answer.json()["data"]["id"]
    canceled = church.api.post(f"/v1/messages/{message_id}/cancel")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["data"]["status"] == "canceled"
    assert canceled.json()["data"]["canceled_at"]
    time.sleep(4)  # past send_at, several scheduler ticks
    detail = church.api.get(f"/v1/messages/{message_id}").json()["data"]
    assert detail["status"] == "canceled"
    assert sum(detail["counts"].values()) == 0
    assert texts_sent(sim_url, [phone]) == [0]
    listed = church.api.get("/v1/messages", params={"status": "canceled"}).json()["data"]
    assert [m["id"] for m in listed] == [message_id]
    twice = church.api.post(f"/v1/messages/{message_id}/cancel")
    assert twice.status_code == 409


def test_an_immediate_message_cannot_be_canceled(church: Church) -> None:
    group = church.group()
    church.member(unique_phone(), [group])
    message_id = church.broadcast(group)
    answer = church.api.post(f"/v1/messages/{message_id}/cancel")
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "conflict"


def test_template_send_renders_merge_fields(church: Church, stack: Stack, sim_url: str) -> None:
    group = church.group()
    phones = {"Ada": unique_phone(), "Grace": unique_phone()}
    members = {
        name: church.member(phone, [group], first_name=name, last_name="Hopper")
        for name, phone in phones.items()
    }
    template = make_template(church, stack, "Hi {{first_name}} {{last_name}}, from {{church_name}}")
    answer = church.api.post(
        "/v1/messages", json={"template_id": template, "target": {"group_ids": [group]}}
    )
    assert answer.status_code == 202, answer.text
    data = answer.json()["data"]
    assert data["personalized"] is True
    assert data["template_id"] == template
    # Segments of the text as written (the un-rendered template).
    assert data["segments"] == 1
    message_id = data["id"]
    counts = church.counts_when(message_id, lambda c: c["delivered"] == 2, 20)
    assert counts["delivered"] == 2, counts
    detail = church.api.get(f"/v1/messages/{message_id}").json()["data"]
    assert detail["body"] == "Hi {{first_name}} {{last_name}}, from {{church_name}}"
    recipients = church.api.get(f"/v1/messages/{message_id}/recipients").json()["data"]
    by_member = {r["member_id"]: r for r in recipients}
    for name, phone in phones.items():
        recipient = by_member[members[name]]
        rendered = f"Hi {name} Hopper, from Grace Chapel"
        assert sent_text_was(stack, sim_url, church, message_id, recipient, phone, rendered) == 200
        assert (
            sent_text_was(stack, sim_url, church, message_id, recipient, phone, detail["body"])
            == 422
        )
    assert texts_sent(sim_url, list(phones.values())) == [1, 1]


def test_body_with_merge_fields_is_rendered_per_recipient(
    church: Church, stack: Stack, sim_url: str
) -> None:
    phone = unique_phone()
    member = church.member(phone, first_name="Lydia", last_name="Purple")
    answer = church.api.post(
        "/v1/messages",
        json={"body": "Thank you {{full_name}}!", "target": {"member_ids": [member]}},
    )
    message_id = answer.json()["data"]["id"]
    church.counts_when(message_id, lambda c: c["delivered"] == 1, 20)
    recipient = church.api.get(f"/v1/messages/{message_id}/recipients").json()["data"][0]
    text = "Thank you Lydia Purple!"
    assert sent_text_was(stack, sim_url, church, message_id, recipient, phone, text) == 200


def _fields(answer: httpx.Response) -> set[str]:
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "validation_error"
    return {d["field"] for d in answer.json()["error"]["details"]}


def test_validation_errors_name_their_fields(church: Church, stack: Stack) -> None:
    member = church.member(unique_phone())
    target = {"member_ids": [member]}
    post = church.api.post
    assert _fields(post("/v1/messages", json={"target": target})) == {"body"}
    template = make_template(church, stack, "Hello")
    both = {"body": "x", "template_id": template, "target": target}
    assert _fields(post("/v1/messages", json=both)) == {"body"}
    unknown = {"body": "Hi {{nickname}}", "target": target}
    assert _fields(post("/v1/messages", json=unknown)) == {"body"}
    unbalanced = {"body": "Hi {{first_name}", "target": target}
    assert _fields(post("/v1/messages", json=unbalanced)) == {"body"}
    past = {"body": "x", "target": target, "send_at": _soon(-60)}
    assert _fields(post("/v1/messages", json=past)) == {"send_at"}
    far = {"body": "x", "target": target, "send_at": _soon(400 * 86400)}
    assert _fields(post("/v1/messages", json=far)) == {"send_at"}
    naive = {"body": "x", "target": target, "send_at": "2030-01-01T10:00:00"}
    assert _fields(post("/v1/messages", json=naive)) == {"send_at"}
    garbage = {"body": "x", "target": target, "send_at": "tomorrow"}
    assert _fields(post("/v1/messages", json=garbage)) == {"send_at"}
    no_target = {"body": "x", "target": {}}
    assert _fields(post("/v1/messages", json=no_target)) == {"target"}
    assert _fields(church.api.get("/v1/messages", params={"status": "paused"})) == {"status"}


def test_another_churchs_messages_and_templates_are_not_found(
    church: Church, other_church: Church, stack: Stack
) -> None:
    group = other_church.group()
    other_church.member(unique_phone(), [group])
    theirs = other_church.api.post(
        "/v1/messages",
        json={"body": "Theirs", "target": {"group_ids": [group]}, "send_at": _soon(30)},
    ).json()["data"]["id"]
    for method, path in [
        ("GET", f"/v1/messages/{theirs}"),
        ("POST", f"/v1/messages/{theirs}/cancel"),
        ("GET", f"/v1/messages/{theirs}/recipients"),
        ("GET", f"/v1/messages/{theirs}/analytics"),
        ("POST", f"/v1/messages/{uuid.uuid4()}/cancel"),
        ("POST", "/v1/messages/not-an-id/cancel"),
    ]:
        answer = church.api.request(method, path)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"]["code"] == "not_found"
    their_template = make_template(other_church, stack, "Hello {{first_name}}")
    member = church.member(unique_phone())
    answer = church.api.post(
        "/v1/messages", json={"template_id": their_template, "target": {"member_ids": [member]}}
    )
    assert answer.status_code == 404, answer.text
    # Still scheduled: the other church's cancel attempt changed nothing.
    assert other_church.api.get(f"/v1/messages/{theirs}").json()["data"]["status"] == "scheduled"
    assert other_church.api.post(f"/v1/messages/{theirs}/cancel").status_code == 200
