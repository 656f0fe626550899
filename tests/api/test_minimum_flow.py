"""The minimum flow of docs/protocol.md, the envelope, validation and tenancy.

A broadcast delivered to every recipient, followed by the API and by a WebSocket
client, runs on a standalone Redis and on a Redis Cluster (``any_church``,
tests/conftest.py), with the same assertions."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import anyio
import httpx
import pytest
import websockets

from tests.conftest import MONITORING, Church, unique_phone


def test_signup_to_delivered(any_church: Church) -> None:
    church = any_church
    group = church.group()
    members = [church.member(unique_phone(), [group]) for _ in range(3)]
    answer = church.api.post(
        "/v1/messages", json={"body": "Service at 10am", "target": {"group_ids": [group]}}
    )
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["success"] is True
    assert body["meta"]["request_id"]
    data = body["data"]
    assert data["status"] == "queued"
    assert data["recipient_count"] == 3
    message_id = data["id"]

    counts = church.counts_when(message_id, lambda c: c["delivered"] == 3, 20)
    assert counts["delivered"] == 3, counts
    detail = church.api.get(f"/v1/messages/{message_id}").json()["data"]
    assert set(detail["counts"]) == {
        "queued",
        "sending",
        "sent",
        "delivered",
        "failed",
        "undelivered",
        "skipped",
    }
    recipients = church.api.get(f"/v1/messages/{message_id}/recipients").json()
    assert {r["member_id"] for r in recipients["data"]} == set(members)
    for r in recipients["data"]:
        assert r["status"] == "delivered"
        assert r["provider_message_id"]
        assert r["error_code"] is None
    assert recipients["meta"]["next_cursor"] is None


@pytest.mark.anyio
async def test_a_websocket_client_follows_a_broadcast_to_delivered(
    any_church: Church, any_base_url: str, any_sim_url: str
) -> None:
    """A client subscribed to ``message:<id>`` gets each recipient's statuses, in order,
    up to ``delivered``. The provider is down until the client has subscribed, so no
    text can be sent (nor its status published) before then."""
    church = any_church
    group = church.group()
    members = {church.member(unique_phone(), [group]) for _ in range(3)}
    statuses: dict[str, list[str]] = {}
    sim = httpx.AsyncClient(base_url=any_sim_url, timeout=10)

    async def outage(on: bool) -> None:
        (await sim.post("/_sim/config", json={"outage": on})).raise_for_status()

    await outage(True)
    try:
        message_id = church.broadcast(group, "Vespers at six")
        async with websockets.connect(
            any_base_url.replace("http://", "ws://") + "/v1/realtime",
            additional_headers={"Authorization": f"Bearer {church.key}"},
        ) as ws:

            async def frame() -> dict[str, Any]:
                found: dict[str, Any] = json.loads(await ws.recv())
                return found

            assert (await frame())["type"] == "welcome"
            channel = f"message:{message_id}"
            await ws.send(json.dumps({"type": "subscribe", "id": "s1", "channel": channel}))
            with anyio.fail_after(10):
                subscribed = await frame()
            assert (subscribed["type"], subscribed["channel"]) == ("subscribed", channel)
            await outage(False)
            with anyio.fail_after(30):
                while {m for m, seen in statuses.items() if "delivered" in seen} != members:
                    event = await frame()
                    assert event["type"] == "event", event
                    if event["event"]["type"] == "message.recipient.status":
                        data = event["event"]["data"]
                        assert data["message_id"] == message_id
                        statuses.setdefault(data["member_id"], []).append(data["status"])
    finally:
        await outage(False)
        await sim.aclose()
    assert set(statuses) == members
    order = ["queued", "sending", "sent", "delivered"]
    for seen in statuses.values():
        assert set(seen) <= set(order), statuses
        assert seen == sorted(seen, key=order.index), statuses
        assert seen[-1] == "delivered", statuses


def test_pagination_walks_every_member_once(church: Church) -> None:
    created = {church.member(unique_phone()) for _ in range(7)}
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = church.api.get("/v1/members", params=params).json()
        seen += [m["id"] for m in page["data"]]
        cursor = page["meta"]["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(created)


def test_unauthenticated_requests_get_401(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as anonymous:
        for method, path in [("GET", "/v1/messages"), ("POST", "/v1/groups"), ("GET", "/v1/me")]:
            answer = anonymous.request(method, path, json={})
            assert answer.status_code == 401
            error = answer.json()
            assert error["success"] is False
            assert error["error"]["code"] == "unauthorized"
        bad_key = anonymous.get("/v1/messages", headers={"Authorization": "Bearer kn_abc_def"})
        assert bad_key.status_code == 401


def test_validation_errors_name_the_field(church: Church) -> None:
    answer = church.api.post("/v1/members", json={"first_name": "Ada", "phone": "12345"})
    assert answer.status_code == 422
    assert answer.json()["error"]["details"] == [
        {"field": "phone", "message": "must be a valid phone number"}
    ]
    answer = church.api.post("/v1/groups", json={"name": "x", "colour": "red"})
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "validation_error"
    assert answer.json()["error"]["details"][0]["field"] == "colour"
    answer = church.api.post("/v1/messages", json={"body": "hi", "target": {}})
    assert answer.status_code == 422
    assert answer.json()["error"]["details"][0]["field"] == "target"
    answer = church.api.post("/v1/messages", json={"target": {"all": True}})
    assert answer.status_code == 422
    assert answer.json()["error"]["details"][0] == {"field": "body", "message": "is required"}
    answer = church.api.post(
        "/v1/groups", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "bad_request"
    answer = church.api.get("/v1/messages", params={"limit": 500})
    assert answer.status_code == 422
    assert answer.json()["error"]["details"][0]["field"] == "limit"


def test_oversized_bodies_get_413_and_change_nothing(church: Church) -> None:
    before = church.api.get("/v1/groups").json()["data"]
    big = {"name": "x" * 2_000_000}
    answer = church.api.post("/v1/groups", json=big)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "payload_too_large"
    assert church.api.get("/v1/groups").json()["data"] == before


def test_another_churchs_ids_are_not_found(church: Church, other_church: Church) -> None:
    group = other_church.group()
    member = other_church.member(unique_phone(), [group])
    sent = other_church.api.post(
        "/v1/messages", json={"body": "hello", "target": {"group_ids": [group]}}
    )
    message = sent.json()["data"]["id"]
    for path in [
        f"/v1/groups/{group}",
        f"/v1/members/{member}",
        f"/v1/messages/{message}",
        f"/v1/messages/{message}/recipients",
        f"/v1/conversations/{uuid.uuid4()}",
    ]:
        answer = church.api.get(path)
        assert answer.status_code == 404, path
        assert answer.json()["error"]["code"] == "not_found"
    answer = church.api.post("/v1/messages", json={"body": "x", "target": {"group_ids": [group]}})
    assert answer.status_code == 404
    answer = church.api.post(
        "/v1/members", json={"first_name": "A", "phone": unique_phone(), "group_ids": [group]}
    )
    assert answer.status_code == 404
    assert church.api.get("/v1/messages").json()["data"] == []


def test_cookie_writes_need_the_csrf_token(church: Church) -> None:
    answer = church.session.post(
        "/v1/groups", json={"name": "No token"}, headers={"X-CSRF-Token": ""}
    )
    assert answer.status_code == 403
    answer = church.session.post(
        "/v1/groups", json={"name": "Wrong token"}, headers={"X-CSRF-Token": "x" * 32}
    )
    assert answer.status_code == 403
    answer = church.session.post(
        "/v1/groups", json={"name": "With token"}, headers={"X-CSRF-Token": church.csrf}
    )
    assert answer.status_code == 201
    me = church.session.get("/v1/me").json()["data"]
    assert me["church"]["id"] == church.id
    assert me["user"]["id"] == church.user_id


def test_login_and_wrong_password(church: Church, base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        wrong = client.post(
            "/v1/auth/login", json={"email": church.email, "password": "not the password"}
        )
        assert wrong.status_code == 401
        right = client.post(
            "/v1/auth/login", json={"email": church.email, "password": "correct horse battery"}
        )
        assert right.status_code == 200
        assert client.get("/v1/me").json()["data"]["church"]["id"] == church.id


def test_signup_rules(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        short = client.post(
            "/v1/auth/signup",
            json={"church_name": "X", "email": "a@example.org", "password": "short"},
        )
        assert short.status_code == 422
        assert short.json()["error"]["details"][0]["field"] == "password"


def test_health_endpoints(base_url: str) -> None:
    for path in ["/health", "/health/live", "/health/ready"]:
        answer = httpx.get(base_url + path)
        assert answer.status_code == 200, path
    # The detailed view is for operators (tests/api/test_health.py).
    assert httpx.get(base_url + "/health/detailed").status_code == 401
    detailed = httpx.get(base_url + "/health/detailed", headers=MONITORING).json()["data"]
    assert detailed["checks"]["database"]["ok"] is True
    assert detailed["checks"]["redis"]["ok"] is True
    assert "pending" in detailed["checks"]["queue"]


def test_webhook_endpoint_secret(church: Church) -> None:
    answer = church.api.post(
        "/v1/webhook-endpoints",
        json={"url": "https://example.org/hooks", "events": ["message.*"]},
    )
    assert answer.status_code == 201
    assert answer.json()["data"]["secret"].startswith("whsec_")
    listed = church.api.get("/v1/webhook-endpoints").json()["data"]
    assert "secret" not in listed[0]
    bad = church.api.post("/v1/webhook-endpoints", json={"url": "ftp://x", "events": ["nope"]})
    assert bad.status_code == 422


def test_api_keys_list_and_revoke(church: Church, other_church: Church, base_url: str) -> None:
    made = church.session.post("/v1/api-keys", json={"name": "zapier", "scopes": ["read"]})
    assert made.status_code == 201
    key = made.json()["data"]
    listed = church.session.get("/v1/api-keys").json()["data"]
    assert {k["name"] for k in listed} == {"tests", "zapier"}
    assert all("key" not in k and "secret_hash" not in k for k in listed)
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key['key']}"}) as zap:
        assert zap.get("/v1/messages").status_code == 200
        used = {
            k["name"]: k["last_used_at"] for k in church.session.get("/v1/api-keys").json()["data"]
        }
        assert used["zapier"] is not None
        assert zap.post("/v1/groups", json={"name": "x"}).status_code == 403  # read only
        assert other_church.session.delete(f"/v1/api-keys/{key['id']}").status_code == 404
        revoked = church.session.delete(f"/v1/api-keys/{key['id']}")
        assert revoked.status_code == 200
        assert revoked.json()["data"]["revoked_at"] is not None
        assert zap.get("/v1/messages").status_code == 401
    bad_scope = church.session.post("/v1/api-keys", json={"name": "x", "scopes": ["admin"]})
    assert bad_scope.status_code == 422


def test_member_update_and_erasure_keep_counts(church: Church, other_church: Church) -> None:
    group = church.group()
    phone = unique_phone()
    member = church.member(phone, [group])
    changed = church.api.patch(
        f"/v1/members/{member}", json={"first_name": "Grace", "email": "grace@example.org"}
    )
    assert changed.status_code == 200
    assert changed.json()["data"]["first_name"] == "Grace"
    assert changed.json()["data"]["phone"] == phone
    assert church.api.patch(f"/v1/members/{member}", json={"phone": "123"}).status_code == 422
    assert other_church.api.patch(f"/v1/members/{member}", json={}).status_code == 404

    message_id = church.broadcast(group, "Hi")
    church.counts_when(message_id, lambda c: c["delivered"] == 1, 15)
    assert other_church.api.delete(f"/v1/members/{member}").status_code == 404
    erased = church.api.delete(f"/v1/members/{member}")
    assert erased.status_code == 200
    assert church.api.get(f"/v1/members/{member}").status_code == 404
    assert church.api.delete(f"/v1/members/{member}").status_code == 404
    detail = church.api.get(f"/v1/messages/{message_id}").json()["data"]
    assert detail["recipient_count"] == 1
    assert detail["counts"]["delivered"] == 1
    assert church.api.get(f"/v1/groups/{group}").json()["data"]["member_count"] == 0
    # The number may join again, as someone new.
    again = church.member(phone)
    assert again != member


def test_message_list_filters(church: Church) -> None:
    group = church.group()
    church.member(unique_phone(), [group])
    first = church.api.post("/v1/messages", json={"body": "one", "target": {"group_ids": [group]}})
    between = first.json()["data"]["created_at"]
    time.sleep(0.01)
    church.api.post("/v1/messages", json={"body": "two", "target": {"group_ids": [group]}})
    everything = church.api.get("/v1/messages").json()["data"]
    assert [m["body"] for m in everything] == ["two", "one"]
    later = church.api.get("/v1/messages", params={"since": between}).json()["data"]
    assert [m["body"] for m in later] == ["two", "one"]
    earlier = church.api.get("/v1/messages", params={"until": between}).json()["data"]
    assert earlier == []
    future = church.api.get("/v1/messages", params={"since": "2099-01-01T00:00:00Z"}).json()
    assert future["data"] == []
    assert church.api.get("/v1/messages", params={"status": "nope"}).status_code == 422
    assert church.api.get("/v1/messages", params={"since": "yesterday"}).status_code == 422
    assert (
        church.api.get("/v1/messages", params={"since": "2026-11-01T00:00:00"}).status_code == 422
    )


def test_group_membership(church: Church, other_church: Church) -> None:
    group = church.group()
    members = [church.member(unique_phone()) for _ in range(3)]
    added = church.api.post(f"/v1/groups/{group}/members", json={"member_ids": members})
    assert added.status_code == 200
    assert added.json()["data"]["member_count"] == 3
    again = church.api.post(f"/v1/groups/{group}/members", json={"member_ids": members[:1]})
    assert again.json()["data"]["member_count"] == 3
    removed = church.api.delete(f"/v1/groups/{group}/members/{members[0]}")
    assert removed.json()["data"]["member_count"] == 2
    assert church.api.delete(f"/v1/groups/{group}/members/{members[0]}").status_code == 404
    theirs = other_church.member(unique_phone())
    foreign = church.api.post(f"/v1/groups/{group}/members", json={"member_ids": [theirs]})
    assert foreign.status_code == 404
    assert church.api.get(f"/v1/groups/{group}").json()["data"]["member_count"] == 2
    path = f"/v1/groups/{group}/members"
    assert other_church.api.post(path, json={"member_ids": [theirs]}).status_code == 404
    assert church.api.post(path, json={"member_ids": []}).status_code == 422
