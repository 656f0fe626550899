"""Inbound MMS against the running stack: each file copied from the provider's link into
the church's object store, listed on the thread message and in its
``conversation.message.created``; opened by the church's staff and keys only; one copy
however often the webhook comes; links that fail decided as delivery/inbound.py says.

The simulator's own links (``POST /_sim/inbound`` with ``media``) drive the usual path;
for links that fail, the test signs Telnyx webhooks itself (the stack's simulator seed)
naming files on a small server of its own that counts what it served."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import msgspec
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy.stack import Stack
from tests.conftest import Church, texted_in, unique_phone, wait_until

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(700)
SCRIPT = b"<script>alert(1)</script>"  # declared image/png by its sender: refused by content


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _thread(church: Church, conversation_id: str) -> list[dict[str, Any]]:
    answer = church.api.get(f"/v1/conversations/{conversation_id}/messages")
    assert answer.status_code == 200, answer.text
    thread: list[dict[str, Any]] = answer.json()["data"]
    return thread


def _rows(stack: Stack, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def _media_rows(stack: Stack, church: Church) -> list[tuple[Any, ...]]:
    return _rows(
        stack, "SELECT content_type, size, source FROM media WHERE church_id = %s", church.id
    )


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    name = ""
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))


def test_an_inbound_mms_lands_in_the_thread_and_opens_for_its_church_only(
    church: Church, other_church: Church, base_url: str, sim_url: str, stack: Stack
) -> None:
    phone = unique_phone()
    _, conversation_id = texted_in(church, sim_url, phone)
    channel = {"channel": f"conversation:{conversation_id}"}
    auth = {"Authorization": f"Bearer {church.key}"}
    with (
        httpx.Client(base_url=base_url, timeout=10.0) as client,
        client.stream("GET", "/v1/events", params=channel, headers=auth) as stream,
    ):
        assert stream.status_code == 200
        events = _sse(stream.iter_lines())
        assert next(events)[0] == "ready"
        sent = httpx.post(
            f"{sim_url}/_sim/inbound",
            json={
                "from": phone,
                "to": church.phone_number,
                "text": "Our picnic",
                "media": [
                    {"content_type": "image/png", "data_base64": _b64(PNG)},
                    {"content_type": "image/png", "data_base64": _b64(SCRIPT)},
                    {"content_type": "image/jpeg", "data_base64": _b64(JPEG)},
                ],
            },
        )
        assert sent.status_code == 202, sent.text
        published = next(
            frame["event"]["data"]
            for name, frame in events
            if name == "conversation.message.created" and frame["event"]["data"]["body"]
        )
    # The script was skipped (judged by its bytes); the text and the two pictures kept.
    assert published["body"] == "Our picnic"
    media = published["media"]
    assert [(m["content_type"], m["size"]) for m in media] == [
        ("image/png", len(PNG)),
        ("image/jpeg", len(JPEG)),
    ]
    newest = _thread(church, conversation_id)[0]
    assert (newest["direction"], newest["body"]) == ("inbound", "Our picnic")
    assert newest["media"] == media
    assert sorted(_media_rows(stack, church)) == [
        ("image/jpeg", len(JPEG), "inbound"),
        ("image/png", len(PNG), "inbound"),
    ]
    for item, data in zip(media, (PNG, JPEG), strict=True):
        assert item["url"].endswith(f"/v1/media/{item['id']}/content")
        for client in (church.api, church.session):
            opened = client.get(item["url"])
            assert opened.status_code == 200, opened.text
            assert opened.content == data
        assert other_church.api.get(item["url"]).status_code == 404
    # Erasing the member takes the files they texted in with their texts.
    member_id = church.api.get(f"/v1/conversations/{conversation_id}").json()["data"]["member_id"]
    assert church.api.delete(f"/v1/members/{member_id}").status_code in (200, 204)
    assert _thread(church, conversation_id)[0]["media"] == []
    for item in media:
        assert church.api.get(item["url"]).status_code == 404


def test_a_keyword_sent_with_a_picture_still_acts(church: Church, sim_url: str) -> None:
    phone = unique_phone()
    church.member(phone)
    body = {
        "from": phone,
        "to": church.phone_number,
        "text": "HELP",
        "media": [{"content_type": "image/png", "data_base64": _b64(PNG)}],
    }
    assert httpx.post(f"{sim_url}/_sim/inbound", json=body).status_code == 202
    answered: list[dict[str, Any]] = []

    def help_answered() -> bool:
        found = httpx.get(f"{sim_url}/_sim/messages", params={"to": phone}).json()
        answered[:] = found
        return bool(found)

    wait_until(help_answered, 10, "the HELP answer was texted")
    assert answered[0]["from"] == church.phone_number
    assert answered[0]["media_urls"] == []
    (conversation,) = church.conversations_when(1)
    inbound = [m for m in _thread(church, conversation["id"]) if m["direction"] == "inbound"]
    assert [(m["body"], len(m["media"])) for m in inbound] == [("HELP", 1)]


# -- links that fail, and redelivery: the test's own signed webhooks ------------------------


class _Files(BaseHTTPRequestHandler):
    """``/ok.png``; ``/flaky.png`` (503 until ``flaky_failures`` run out); ``/down.png``
    (always 503); ``/slow.png`` (after 3 s); anything else 404. Counts every request by path."""

    hits: Counter[str]
    flaky_failures: list[int]

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.hits[name] += 1
        if name == "ok.png" or (name == "flaky.png" and not self.flaky_failures):
            self._answer(200, PNG, "image/png")
        elif name == "flaky.png":
            self.flaky_failures.pop()
            self._answer(503, b"busy", "text/plain")
        elif name == "down.png":
            self._answer(503, b"busy", "text/plain")
        elif name == "slow.png":
            time.sleep(3)
            self._answer(200, PNG, "image/png")
        else:
            self._answer(404, b"expired", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _file_server(flaky_failures: int = 0) -> Iterator[tuple[str, Counter[str]]]:
    hits: Counter[str] = Counter()
    handler = type("Files", (_Files,), {"hits": hits, "flaky_failures": [0] * flaky_failures})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _deliver(
    stack: Stack,
    base_url: str,
    church: Church,
    phone: str,
    event_id: str,
    urls: list[str],
    attempt: int = 1,
) -> httpx.Response:
    """A signed ``message.received`` with files at ``urls``, as Telnyx sends it."""
    body = msgspec.json.encode(
        {
            "data": {
                "event_type": "message.received",
                "id": event_id,
                "occurred_at": "2026-12-03T10:00:00.000+00:00",
                "record_type": "event",
                "payload": {
                    "id": f"in-{event_id}",
                    "record_type": "message",
                    "direction": "inbound",
                    "type": "MMS",
                    "from": {"phone_number": phone},
                    "to": [{"phone_number": church.phone_number, "status": "webhook_delivered"}],
                    "text": "Photos",
                    "media": [
                        {"url": url, "content_type": "image/png", "size": 1, "hash_sha256": "x"}
                        for url in urls
                    ],
                    "errors": [],
                },
            },
            "meta": {"attempt": attempt, "delivered_to": "x"},
        }
    )
    seed = base64.b64decode(stack.env["KOINONIA_SIM_SIGNING_SEED"])
    stamp = str(int(time.time()))
    signature = Ed25519PrivateKey.from_private_bytes(seed).sign(stamp.encode() + b"|" + body)
    return httpx.post(
        f"{base_url}/v1/provider/telnyx/webhooks",
        content=body,
        headers={
            "telnyx-signature-ed25519": base64.b64encode(signature).decode(),
            "telnyx-timestamp": stamp,
            "content-type": "application/json",
        },
        timeout=15,
    )


def _inbound_media(church: Church) -> list[tuple[str, int]]:
    """(body, number of files) of every inbound text in the church's inbox."""
    found = []
    for conversation in church.api.get("/v1/conversations").json()["data"]:
        for message in _thread(church, conversation["id"]):
            if message["direction"] == "inbound":
                found.append((message["body"], len(message["media"])))
    return found


def test_a_redelivered_mms_is_kept_once_and_not_fetched_again(
    church: Church, stack: Stack, base_url: str
) -> None:
    phone, event_id = unique_phone(), str(uuid.uuid4())
    with _file_server() as (files, hits):
        for _ in range(3):
            answer = _deliver(stack, base_url, church, phone, event_id, [f"{files}/ok.png"])
            assert answer.status_code == 200, answer.text
    assert hits == {"ok.png": 1}
    assert _inbound_media(church) == [("Photos", 1)]
    assert _media_rows(stack, church) == [("image/png", len(PNG), "inbound")]


def test_links_that_fail_ask_for_redelivery_or_are_skipped(
    church: Church, stack: Stack, base_url: str
) -> None:
    phone = unique_phone()
    with _file_server(flaky_failures=1) as (files, hits):
        # Failing for a moment: 503 and nothing written, so the provider redelivers...
        flaky = str(uuid.uuid4())
        first = _deliver(stack, base_url, church, phone, flaky, [f"{files}/flaky.png"])
        assert first.status_code == 503, first.text
        assert first.json()["error"]["code"] == "unavailable"
        assert church.api.get("/v1/conversations").json()["data"] == []
        assert _media_rows(stack, church) == []
        assert _rows(stack, "SELECT 1 FROM provider_event WHERE event_id = %s", flaky) == []
        # ... and the redelivery keeps it.
        second = _deliver(stack, base_url, church, phone, flaky, [f"{files}/flaky.png"], 2)
        assert second.status_code == 200, second.text
        assert _inbound_media(church) == [("Photos", 1)]

        # Still failing at the provider's last try: the text is kept without the file.
        down = _deliver(stack, base_url, church, phone, str(uuid.uuid4()), [f"{files}/down.png"], 3)
        assert down.status_code == 200, down.text
        # An expired link (404) never will work: skipped at once, the rest kept.
        expired = _deliver(
            stack,
            base_url,
            church,
            phone,
            str(uuid.uuid4()),
            [f"{files}/expired.png", f"{files}/ok.png"],
        )
        assert expired.status_code == 200, expired.text
    assert sorted(_inbound_media(church)) == [("Photos", 0), ("Photos", 1), ("Photos", 1)]
    assert len(_media_rows(stack, church)) == 2
    assert hits == {"flaky.png": 2, "down.png": 1, "expired.png": 1, "ok.png": 1}


def test_a_slow_link_is_answered_in_time_and_a_malformed_one_skipped(
    church: Church, stack: Stack, base_url: str
) -> None:
    phone = unique_phone()
    with _file_server() as (files, _):
        # Not had within the budget: 503 at once (the provider waits 2 s for an answer).
        started = time.monotonic()
        slow = _deliver(stack, base_url, church, phone, str(uuid.uuid4()), [f"{files}/slow.png"])
        assert slow.status_code == 503, slow.text
        assert time.monotonic() - started < 2.5
        assert _media_rows(stack, church) == []
    # A link no attempt will open (not a URL httpx can read): skipped, the text kept.
    bad = _deliver(
        stack, base_url, church, phone, str(uuid.uuid4()), ["http://127.0.0.1:abc/x.png"]
    )
    assert bad.status_code == 200, bad.text
    assert _inbound_media(church) == [("Photos", 0)]
