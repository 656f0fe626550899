"""Webhook endpoint management over REST: CRUD, validation, scopes, tenancy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from deploy.stack import Stack, free_ports
from tests.conftest import Church
from tests.delivery.test_webhooks import (
    Receiver,
    attempts_when,
    make_endpoint,
    send_test,
    webhook_processes,
)


@pytest.fixture(scope="module")
def webhook_env(stack: Stack) -> Iterator[None]:
    with webhook_processes(stack):
        yield


@pytest.fixture
def strict_web(stack: Stack, church: Church) -> Iterator[httpx.Client]:
    """A second web process as production runs it: private destinations refused."""
    [port] = free_ports(1)
    env = {**stack.env, "KOINONIA_WEBHOOK_ALLOW_PRIVATE": "false", "KOINONIA_HTTP_PORT": str(port)}
    stack.spawn("web-strict", "web", env=env)
    try:
        stack.wait_ready(f"http://127.0.0.1:{port}/health/ready")
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {church.key}"},
            timeout=10,
        ) as client:
            yield client
    finally:
        stack.stop_process("web-strict")


def test_create_show_list_update_delete(church: Church) -> None:
    created = church.api.post(
        "/v1/webhook-endpoints",
        json={
            "url": "https://example.org/hooks",
            "events": ["message.*", "member.opted_out", "message.*"],
            "description": "Planning Center",
        },
    )
    assert created.status_code == 201, created.text
    data = created.json()["data"]
    assert data["secret"].startswith("whsec_")
    assert data["events"] == ["message.*", "member.opted_out"]
    assert (data["description"], data["enabled"], data["disabled_reason"]) == (
        "Planning Center",
        True,
        None,
    )
    path = f"/v1/webhook-endpoints/{data['id']}"

    shown = church.api.get(path).json()["data"]
    assert "secret" not in shown
    assert shown["url"] == "https://example.org/hooks"
    listed = church.api.get("/v1/webhook-endpoints").json()["data"]
    assert [e["id"] for e in listed] == [data["id"]]
    assert all("secret" not in e for e in listed)

    patched = church.api.patch(
        path,
        json={"url": "https://example.org/v2", "events": ["*"], "description": "v2"},
    )
    assert patched.status_code == 200, patched.text
    assert {k: patched.json()["data"][k] for k in ("url", "events", "description")} == {
        "url": "https://example.org/v2",
        "events": ["*"],
        "description": "v2",
    }
    off = church.api.patch(path, json={"enabled": False}).json()["data"]
    assert (off["enabled"], off["disabled_reason"]) == (False, "manual")
    on = church.api.patch(path, json={"enabled": True}).json()["data"]
    assert (on["enabled"], on["disabled_reason"]) == (True, None)

    deleted = church.api.delete(path)
    assert deleted.status_code == 200
    assert church.api.get(path).status_code == 404
    assert church.api.get("/v1/webhook-endpoints").json()["data"] == []


def test_bad_urls_events_and_fields_are_validation_errors(church: Church) -> None:
    def fields(body: dict[str, object]) -> set[str]:
        answer = church.api.post("/v1/webhook-endpoints", json=body)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "validation_error"
        return {d["field"] for d in answer.json()["error"]["details"]}

    assert fields({"url": "ftp://example.org/x", "events": ["*"]}) == {"url"}
    assert fields({"url": "https://example.org/x", "events": ["message.nope"]}) == {"events"}
    assert fields({"url": "https://example.org/x", "events": ["conversation.typing"]}) == {"events"}
    assert fields({"url": "https://example.org/x", "events": []}) == {"events"}
    assert fields({"url": "https://example.org/x", "events": ["*"], "secret": "x"}) == {"secret"}
    ok = church.api.post(
        "/v1/webhook-endpoints",
        json={"url": "https://example.org/x", "events": ["message.recipient.*"]},
    )
    assert ok.status_code == 201, ok.text
    endpoint_id = ok.json()["data"]["id"]
    bad_patch = church.api.patch(f"/v1/webhook-endpoints/{endpoint_id}", json={"events": ["x"]})
    assert bad_patch.status_code == 422
    assert church.api.get("/v1/webhook-endpoints/not-a-uuid").status_code == 404


def test_private_destinations_are_refused_in_production(
    strict_web: httpx.Client, church: Church
) -> None:
    for url in (
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://10.0.0.7/hook",
        "http://169.254.169.254/latest",
    ):
        answer = strict_web.post("/v1/webhook-endpoints", json={"url": url, "events": ["*"]})
        assert answer.status_code == 422, (url, answer.text)
        assert answer.json()["error"]["details"][0]["field"] == "url"
    public = strict_web.post(
        "/v1/webhook-endpoints", json={"url": "https://example.org/hook", "events": ["*"]}
    )
    assert public.status_code == 201, public.text
    moved = strict_web.patch(
        f"/v1/webhook-endpoints/{public.json()['data']['id']}",
        json={"url": "http://192.168.1.20/hook"},
    )
    assert moved.status_code == 422
    assert moved.json()["error"]["details"][0]["field"] == "url"


def test_a_read_only_key_cannot_change_endpoints(church: Church, base_url: str) -> None:
    made = church.session.post("/v1/api-keys", json={"name": "reader", "scopes": ["read"]})
    assert made.status_code == 201, made.text
    endpoint_id, _ = make_endpoint(church, "https://example.org/hooks", ["*"])
    with httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {made.json()['data']['key']}"}
    ) as reader:
        assert reader.get(f"/v1/webhook-endpoints/{endpoint_id}").status_code == 200
        for method, path in [
            ("POST", "/v1/webhook-endpoints"),
            ("PATCH", f"/v1/webhook-endpoints/{endpoint_id}"),
            ("DELETE", f"/v1/webhook-endpoints/{endpoint_id}"),
            ("POST", f"/v1/webhook-endpoints/{endpoint_id}/rotate-secret"),
            ("POST", f"/v1/webhook-endpoints/{endpoint_id}/test"),
        ]:
            answer = reader.request(method, path, json={"url": "https://example.org/x"})
            assert answer.status_code == 403, (method, path, answer.text)


@pytest.mark.usefixtures("webhook_env")
def test_another_churchs_endpoint_is_not_found_on_every_route(
    church: Church, other_church: Church
) -> None:
    receiver = Receiver()
    try:
        endpoint_id, _ = make_endpoint(church, receiver.base + "/mine", ["member.*"])
        send_test(church, endpoint_id)
        [attempt] = attempts_when(church, endpoint_id, lambda a: len(a) >= 1)
    finally:
        receiver.close()
    one = f"/v1/webhook-endpoints/{endpoint_id}"
    routes = [
        ("GET", one, None),
        ("PATCH", one, {"description": "mine now"}),
        ("DELETE", one, None),
        ("POST", f"{one}/rotate-secret", None),
        ("GET", f"{one}/attempts", None),
        ("POST", f"{one}/attempts/{attempt['id']}/replay", None),
        ("POST", f"{one}/test", None),
    ]
    for method, path, body in routes:
        answer = other_church.api.request(method, path, json=body)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"]["code"] == "not_found"
    # Their own endpoint does not reach this church's attempt either.
    theirs, _ = make_endpoint(other_church, "https://example.org/theirs", ["*"])
    crossed = other_church.api.post(
        f"/v1/webhook-endpoints/{theirs}/attempts/{attempt['id']}/replay"
    )
    assert crossed.status_code == 404
    assert other_church.api.get("/v1/webhook-endpoints").json()["data"][0]["id"] == theirs
    # And nothing changed here.
    assert church.api.get(one).json()["data"]["description"] == ""
    assert len(church.api.get(f"{one}/attempts").json()["data"]) == 1
    unknown = church.api.get(f"/v1/webhook-endpoints/{uuid.uuid4()}")
    assert unknown.status_code == 404
