"""Outgoing webhooks end to end: the real stack's worker POSTs to a receiver that
this test runs on 127.0.0.1, and the receiver checks every request with the
``standardwebhooks`` reference verifier. Two of them (filters and signatures, a retry)
run on a standalone Redis and on a Redis Cluster (``any_stack``, tests/conftest.py),
with the same assertions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from aiohttp.resolver import ThreadedResolver
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from delivery.webhook_sender import DestinationRefused, PublicOnlyResolver, literal_problem
from delivery.webhook_signatures import signed_headers
from deploy.stack import Stack
from storage.pg.webhook_endpoints import new_secret, url_problem
from storage.pg.webhook_outbox import matches, patterns_of
from tests.conftest import Church, unique_phone

WEBHOOK_ENV = {
    "KOINONIA_WEBHOOK_ALLOW_PRIVATE": "true",
    # 8 attempts over ~2 s instead of ~27.6 h.
    "KOINONIA_WEBHOOK_RETRY_SCALE": "0.00002",
    "KOINONIA_WEBHOOK_FAILURE_THRESHOLD": "3",
}
INTEREST_LAG_S = 1.5
"""How long a change of endpoints takes to reach every process's interest cache."""


# -- the receiver ---------------------------------------------------------------


class Hook(msgspec.Struct, frozen=True):
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        decoded: dict[str, Any] = msgspec.json.decode(self.body)
        return decoded

    @property
    def type(self) -> str:
        return str(self.json()["type"])


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST. ``answer(path, [500,
    200])`` scripts the statuses for a path (then 200); ``always(path, 500)``."""

    def __init__(self) -> None:
        self.hooks: list[Hook] = []
        self._scripts: dict[str, list[tuple[int, bytes]]] = {}
        self._always: dict[str, tuple[int, bytes]] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                status, reply = receiver._record(
                    Hook(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                self.send_response(status)
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _record(self, hook: Hook) -> tuple[int, bytes]:
        with self._lock:
            self.hooks.append(hook)
            script = self._scripts.get(hook.path)
            if script:
                return script.pop(0)
            return self._always.get(hook.path, (200, b"thanks"))

    def answer(self, path: str, statuses: list[int], body: bytes = b"") -> None:
        self._scripts[path] = [(s, body) for s in statuses]

    def always(self, path: str, status: int, body: bytes = b"") -> None:
        self._always[path] = (status, body)

    def at(self, path: str) -> list[Hook]:
        with self._lock:
            return [h for h in self.hooks if h.path == path]

    def wait(
        self, path: str, done: Callable[[list[Hook]], bool], seconds: float = 15
    ) -> list[Hook]:
        """The hooks at ``path`` once ``done`` holds, or whatever came when time ran out."""
        deadline = time.monotonic() + seconds
        while True:
            hooks = self.at(path)
            if done(hooks) or time.monotonic() > deadline:
                return hooks
            time.sleep(0.05)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@contextlib.contextmanager
def webhook_processes(stack: Stack) -> Iterator[None]:
    """Web and worker with ``WEBHOOK_ENV`` for the duration (a no-op once the suite's
    stack sets those variables itself), then as they were."""
    missing = {k: v for k, v in WEBHOOK_ENV.items() if k not in stack.env}
    if not missing:
        yield
        return
    original = dict(stack.env)

    def restart(env: dict[str, str]) -> None:
        stack.env = env
        for name in ("web", "worker"):
            stack.stop_process(name)
            stack.spawn(name, name)
        stack.wait_ready()

    restart({**original, **missing})
    try:
        yield
    finally:
        restart(original)


@pytest.fixture(scope="module")
def webhook_env(stack: Stack) -> Iterator[None]:
    with webhook_processes(stack):
        yield


def make_endpoint(church: Church, url: str, events: list[str]) -> tuple[str, str]:
    answer = church.api.post("/v1/webhook-endpoints", json={"url": url, "events": events})
    assert answer.status_code == 201, answer.text
    data = answer.json()["data"]
    return str(data["id"]), str(data["secret"])


def verified(hook: Hook, secret: str) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(hook.body, hook.headers)
    return payload


def attempts_when(
    church: Church,
    endpoint_id: str,
    done: Callable[[list[dict[str, Any]]], bool],
    seconds: float = 15,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while True:
        answer = church.api.get(f"/v1/webhook-endpoints/{endpoint_id}/attempts")
        assert answer.status_code == 200, answer.text
        found: list[dict[str, Any]] = answer.json()["data"]
        if done(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def endpoint_when(
    church: Church, endpoint_id: str, done: Callable[[dict[str, Any]], bool], seconds: float = 15
) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        found: dict[str, Any] = church.api.get(f"/v1/webhook-endpoints/{endpoint_id}").json()[
            "data"
        ]
        if done(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def send_test(church: Church, endpoint_id: str) -> str:
    answer = church.api.post(f"/v1/webhook-endpoints/{endpoint_id}/test")
    assert answer.status_code == 202, answer.text
    return str(answer.json()["data"]["event_id"])


def text_in(sim_url: str, church: Church, phone: str, text: str = "Hi") -> None:
    answer = httpx.post(
        f"{sim_url}/_sim/inbound", json={"from": phone, "to": church.phone_number, "text": text}
    )
    answer.raise_for_status()


# -- pure pieces ------------------------------------------------------------------


def test_signatures_verify_with_the_reference_library() -> None:
    secret, older = new_secret(), new_secret()
    body = b'{"type":"member.created","timestamp":"2026-01-01T00:00:00.000Z","data":{}}'
    headers = signed_headers("msg_1", int(time.time()), body, [secret, older])
    assert headers["webhook-signature"].count("v1,") == 2
    for key in (secret, older):
        assert Webhook(key).verify(body, headers)["type"] == "member.created"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32


def test_filters_match_exact_types_prefixes_and_everything() -> None:
    assert patterns_of("message.recipient.status") == (
        "*",
        "message.*",
        "message.recipient.*",
        "message.recipient.status",
    )
    assert matches(["message.*"], "message.completed")
    assert matches(["message.recipient.*"], "message.recipient.status")
    assert matches(["*"], "webhook_endpoint.disabled")
    assert not matches(["message.completed"], "message.created")
    assert not matches(["member.*"], "message.created")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000/hook",
        "http://[::1]/hook",
        "http://localhost/hook",
        "http://api.localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "http://100.64.0.1/hook",
    ],
)
def test_private_destinations_are_refused_unless_allowed(url: str) -> None:
    assert url_problem(url, allow_private=False) is not None
    assert url_problem(url, allow_private=True) is None


def test_urls_must_be_absolute_http() -> None:
    assert url_problem("https://example.org/hooks", allow_private=False) is None
    assert url_problem("http://8.8.8.8/hooks", allow_private=False) is None
    for bad in (
        "ftp://example.org/x",
        "example.org/hooks",
        "https:///x",
        "https://u:p@example.org/",
    ):
        assert url_problem(bad, allow_private=True) is not None, bad


def test_send_time_check_refuses_what_a_name_resolves_to() -> None:
    """A name is resolved and checked where the connection is made."""

    async def resolve(host: str) -> list[str]:
        resolver = PublicOnlyResolver(ThreadedResolver())
        try:
            return [r["host"] for r in await resolver.resolve(host, 80)]
        finally:
            await resolver.close()

    with pytest.raises(DestinationRefused):
        asyncio.run(resolve("localhost"))
    assert literal_problem("http://127.0.0.1/x", allow_private=False) is not None
    assert literal_problem("http://127.0.0.1/x", allow_private=True) is None
    assert literal_problem("http://8.8.8.8/x", allow_private=False) is None


# -- against the stack ------------------------------------------------------------


@pytest.mark.usefixtures("webhook_env")
def test_events_arrive_signed_and_respect_filters(
    any_church: Church, receiver: Receiver, any_sim_url: str
) -> None:
    church, sim_url = any_church, any_sim_url
    exact, exact_secret = make_endpoint(
        church, receiver.base + "/exact", ["conversation.message.created"]
    )
    _, every_secret = make_endpoint(church, receiver.base + "/every", ["*"])
    make_endpoint(church, receiver.base + "/members", ["member.*"])
    phone = unique_phone()
    member_id = church.member(phone)
    text_in(sim_url, church, phone, "Is choir on tonight?")

    hooks = receiver.wait(
        "/every", lambda h: {"conversation.created", "conversation.message.created"} <= _types(h)
    )
    assert {"conversation.created", "conversation.message.created"} <= _types(hooks)
    [posted] = receiver.wait("/exact", lambda h: len(h) >= 1)
    payload = verified(posted, exact_secret)
    assert payload["type"] == "conversation.message.created"
    assert payload["timestamp"].endswith("Z")
    data = payload["data"]
    assert data["member_id"] == member_id
    assert data["direction"] == "inbound"
    assert data["body"] == "Is choir on tonight?"
    assert {"conversation_id", "message_id", "created_at"} <= set(data)
    assert posted.headers["webhook-id"].startswith("msg_")
    assert posted.headers["content-type"] == "application/json"
    for hook in hooks:
        verified(hook, every_secret)
    # The same event has the same webhook-id at every endpoint that receives it.
    same = [h for h in hooks if h.type == "conversation.message.created"]
    assert same[0].headers["webhook-id"] != ""
    time.sleep(0.5)
    assert len(receiver.at("/exact")) == 1
    assert not any(h.type.startswith("conversation.") for h in receiver.at("/members"))
    assert all(h.type.startswith("member.") for h in receiver.at("/members"))
    assert exact


@pytest.mark.usefixtures("webhook_env")
def test_a_broadcast_reports_recipient_statuses_and_completion(
    church: Church, receiver: Receiver
) -> None:
    endpoint_id, secret = make_endpoint(
        church, receiver.base + "/messages", ["message.completed", "message.recipient.*"]
    )
    time.sleep(INTEREST_LAG_S)
    group = church.group()
    members = {church.member(unique_phone(), [group]) for _ in range(2)}
    message_id = church.broadcast(group, "Potluck Sunday")

    hooks = receiver.wait(
        "/messages",
        lambda h: "message.completed" in _types(h) and _delivered(h) == members,
        30,
    )
    payloads = [verified(h, secret) for h in hooks]
    [completed] = [p for p in payloads if p["type"] == "message.completed"]
    assert completed["data"]["message_id"] == message_id
    assert completed["data"]["counts"]["delivered"] == 2
    assert _delivered(hooks) == members
    assert _types(hooks) == {"message.completed", "message.recipient.status"}
    statuses = [p["data"] for p in payloads if p["type"] == "message.recipient.status"]
    assert {s["message_id"] for s in statuses} == {message_id}
    attempts = attempts_when(church, endpoint_id, lambda a: len(a) >= len(hooks))
    assert all(a["status_code"] == 200 for a in attempts)


@pytest.mark.usefixtures("webhook_env")
def test_rotation_signs_with_both_secrets_during_the_overlap(
    church: Church, receiver: Receiver
) -> None:
    endpoint_id, old = make_endpoint(church, receiver.base + "/rotate", ["member.*"])
    rotated = church.api.post(f"/v1/webhook-endpoints/{endpoint_id}/rotate-secret")
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["data"]["secret"]
    assert new.startswith("whsec_")
    assert new != old
    assert "secret" not in church.api.get(f"/v1/webhook-endpoints/{endpoint_id}").json()["data"]
    send_test(church, endpoint_id)
    [hook] = receiver.wait("/rotate", lambda h: len(h) >= 1)
    signatures = hook.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(s.startswith("v1,") for s in signatures)
    for secret in (new, old):
        assert verified(hook, secret)["type"] == "webhook_endpoint.test"
    assert verified(hook, new)["data"] == {"endpoint_id": endpoint_id}


@pytest.mark.usefixtures("webhook_env")
def test_a_failed_attempt_is_retried_and_every_attempt_is_logged(
    any_church: Church, receiver: Receiver
) -> None:
    church = any_church
    endpoint_id, secret = make_endpoint(church, receiver.base + "/flaky", ["member.*"])
    receiver.answer("/flaky", [500, 200], body=b"x" * 5000)
    event_id = send_test(church, endpoint_id)

    hooks = receiver.wait("/flaky", lambda h: len(h) >= 2)
    assert [h.headers["webhook-id"] for h in hooks] == [event_id, event_id]
    assert hooks[0].body == hooks[1].body
    verified(hooks[1], secret)
    attempts = attempts_when(church, endpoint_id, lambda a: len(a) >= 2)
    second, first = attempts  # newest first
    assert (first["attempt"], first["status_code"]) == (1, 500)
    assert (second["attempt"], second["status_code"]) == (2, 200)
    assert first["event_id"] == second["event_id"] == event_id
    assert first["event_type"] == "webhook_endpoint.test"
    assert first["response_excerpt"] == "x" * 1024
    assert first["latency_ms"] >= 0
    assert first["error"] is None
    assert {"id", "created_at", "trigger"} <= set(first)
    time.sleep(0.3)
    assert len(receiver.at("/flaky")) == 2
    # Pages, newest first.
    page = church.api.get(f"/v1/webhook-endpoints/{endpoint_id}/attempts?limit=1").json()
    assert page["data"][0]["id"] == second["id"]
    cursor = page["meta"]["next_cursor"]
    rest = church.api.get(
        f"/v1/webhook-endpoints/{endpoint_id}/attempts", params={"limit": 1, "cursor": cursor}
    ).json()
    assert rest["data"][0]["id"] == first["id"]
    assert rest["meta"]["next_cursor"] is None


@pytest.mark.usefixtures("webhook_env")
def test_a_410_disables_the_endpoint_at_once(church: Church, receiver: Receiver) -> None:
    gone_id, _ = make_endpoint(church, receiver.base + "/gone", ["member.*"])
    _, watcher_secret = make_endpoint(
        church, receiver.base + "/watcher", ["webhook_endpoint.disabled"]
    )
    receiver.always("/gone", 410)
    send_test(church, gone_id)

    endpoint = endpoint_when(church, gone_id, lambda e: not e["enabled"])
    assert (endpoint["enabled"], endpoint["disabled_reason"]) == (False, "gone")
    [hook] = receiver.wait("/watcher", lambda h: len(h) >= 1)
    payload = verified(hook, watcher_secret)
    assert payload["type"] == "webhook_endpoint.disabled"
    assert payload["data"] == {"endpoint_id": gone_id, "reason": "gone"}
    time.sleep(0.3)
    assert len(receiver.at("/gone")) == 1


@pytest.mark.usefixtures("webhook_env")
def test_persistent_failure_disables_the_endpoint(
    church: Church, receiver: Receiver, sim_url: str
) -> None:
    failing_id, _ = make_endpoint(church, receiver.base + "/down", ["conversation.*"])
    _, watcher_secret = make_endpoint(church, receiver.base + "/watcher", ["webhook_endpoint.*"])
    receiver.always("/down", 503, b"maintenance")
    phone = unique_phone()
    church.member(phone)
    # Each text is two events (conversation created/updated, message created);
    # the threshold in the test env is three deliveries that used every retry.
    text_in(sim_url, church, phone, "one")
    text_in(sim_url, church, phone, "two")

    endpoint = endpoint_when(church, failing_id, lambda e: not e["enabled"], 40)
    assert (endpoint["enabled"], endpoint["disabled_reason"]) == (False, "persistent_failure")
    [hook] = receiver.wait("/watcher", lambda h: len(h) >= 1)
    assert verified(hook, watcher_secret)["data"] == {
        "endpoint_id": failing_id,
        "reason": "persistent_failure",
    }
    attempts = attempts_when(church, failing_id, lambda a: len(a) >= 24)
    per_event: dict[str, int] = {}
    for a in attempts:
        per_event[a["event_id"]] = max(per_event.get(a["event_id"], 0), a["attempt"])
        assert a["status_code"] == 503
        assert a["response_excerpt"] == "maintenance"
    assert sorted(per_event.values()).count(8) >= 3, per_event

    # Re-enabling clears the failure record; later events are sent again.
    receiver.always("/down", 200)
    answer = church.api.patch(f"/v1/webhook-endpoints/{failing_id}", json={"enabled": True})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["data"]["enabled"], answer.json()["data"]["disabled_reason"]) == (
        True,
        None,
    )
    before = len(receiver.at("/down"))
    text_in(sim_url, church, phone, "three")
    assert len(receiver.wait("/down", lambda h: len(h) >= before + 2)) >= before + 2


@pytest.mark.usefixtures("webhook_env")
def test_replay_sends_the_delivery_again(church: Church, receiver: Receiver) -> None:
    endpoint_id, secret = make_endpoint(church, receiver.base + "/replay", ["member.*"])
    event_id = send_test(church, endpoint_id)
    [first] = attempts_when(church, endpoint_id, lambda a: len(a) >= 1)
    assert first["status_code"] == 200

    answer = church.api.post(f"/v1/webhook-endpoints/{endpoint_id}/attempts/{first['id']}/replay")
    assert answer.status_code == 202, answer.text
    assert answer.json()["data"]["event_id"] == event_id
    hooks = receiver.wait("/replay", lambda h: len(h) >= 2)
    assert [h.headers["webhook-id"] for h in hooks] == [event_id, event_id]
    verified(hooks[1], secret)
    latest = attempts_when(church, endpoint_id, lambda a: len(a) >= 2)[0]
    assert (latest["attempt"], latest["trigger"], latest["status_code"]) == (2, "manual", 200)
    unknown = church.api.post(f"/v1/webhook-endpoints/{endpoint_id}/attempts/{uuid.uuid4()}/replay")
    assert unknown.status_code == 404


def _types(hooks: list[Hook]) -> set[str]:
    return {h.type for h in hooks}


def _delivered(hooks: list[Hook]) -> set[str]:
    return {
        h.json()["data"]["member_id"]
        for h in hooks
        if h.type == "message.recipient.status" and h.json()["data"]["status"] == "delivered"
    }
