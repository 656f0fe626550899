"""The simulator's MMS: ``media_urls`` fetched as a carrier does and listed by
``GET /_sim/messages``; files a member sends served at expiring links in Telnyx's
``message.received`` shape. Over real sockets, as tests/delivery/test_simulator.py does
(its harness: the simulator and a webhook receiver under uvicorn in the test); a third
server here plays the church's media host."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from delivery.simulator_state import AcceptedLog, AcceptedSend, InboundMediaStore
from storage.domain.media_types import MAX_MEDIA_BYTES
from tests.delivery.test_simulator import AUTH, CHURCH, MEMBER, _serve, running

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
JPEG = b"\xff\xd8\xff\xe0" + b"\x10JFIF" + bytes(500)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class MediaHost:
    """The app's side of ``media_urls``: serves a few files and counts what was fetched."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        files: dict[str, tuple[bytes, str | None]] = {
            "flyer.png": (PNG, "image/png"),
            # Declared as octet-stream: the carrier judges it by its bytes.
            "photo": (JPEG, "application/octet-stream"),
            "huge.png": (PNG + bytes(MAX_MEDIA_BYTES), "image/png"),
        }

        async def serve(request: Request) -> Response:
            name = request.path_params["name"]
            self.hits.append(name)
            if name not in files:
                return Response("gone", status_code=404)
            data, content_type = files[name]
            return Response(data, media_type=content_type)

        self.app = Starlette(routes=[Route("/files/{name}", serve)])


@contextlib.asynccontextmanager
async def media_host() -> AsyncIterator[tuple[MediaHost, str]]:
    host = MediaHost()
    async with anyio.create_task_group() as tg:
        server, url = await _serve(tg, host.app)
        try:
            yield host, f"{url}/files"
        finally:
            server.should_exit = True


async def _accepted(client: httpx.AsyncClient, to: str) -> list[dict[str, Any]]:
    answer = await client.get("/_sim/messages", params={"to": to})
    assert answer.status_code == 200, answer.text
    listed: list[dict[str, Any]] = answer.json()
    return listed


@pytest.mark.anyio
async def test_media_urls_are_fetched_and_listed_with_every_send() -> None:
    async with media_host() as (host, files), running() as sim:
        sms = await sim.send(text="First, a text")
        assert sms.status_code == 200
        urls = [f"{files}/flyer.png", f"{files}/photo"]
        mms = await sim.send(text="Sunday's flyer", media_urls=urls)
        assert mms.status_code == 200, mms.text
        data = mms.json()["data"]
        assert data["type"] == "MMS"
        assert [m["url"] for m in data["media"]] == urls
        assert sorted(host.hits) == ["flyer.png", "photo"]

        # Every accepted send for the destination, oldest first; other numbers apart.
        assert await _accepted(sim.client, MEMBER) == [
            {
                "from": CHURCH,
                "to": MEMBER,
                "text": "First, a text",
                "media_urls": [],
                "media_sizes": [],
            },
            {
                "from": CHURCH,
                "to": MEMBER,
                "text": "Sunday's flyer",
                "media_urls": urls,
                "media_sizes": [len(PNG), len(JPEG)],
            },
        ]
        assert await _accepted(sim.client, "+15550000001") == []

        # The receipts carry what the carrier fetched (the octet-stream file sniffed).
        hooks = await sim.receiver.wait_for(4)
        [sent] = [
            h["data"]["payload"]
            for h in hooks
            if h["data"]["event_type"] == "message.sent"
            and h["data"]["payload"]["id"] == data["id"]
        ]
        assert sent["media"] == [
            {
                "url": urls[0],
                "content_type": "image/png",
                "sha256": hashlib.sha256(PNG).hexdigest(),
                "size": len(PNG),
            },
            {
                "url": urls[1],
                "content_type": "image/jpeg",
                "sha256": hashlib.sha256(JPEG).hexdigest(),
                "size": len(JPEG),
            },
        ]
        # An idempotent replay neither fetches again nor lists the send twice.
        key = {"Idempotency-Key": "mms-1"}
        first = await sim.send(to="+15550000002", media_urls=urls[:1], headers=key)
        again = await sim.send(to="+15550000002", media_urls=urls[:1], headers=key)
        assert first.json() == again.json()
        assert sorted(host.hits) == ["flyer.png", "flyer.png", "photo"]
        assert [m["media_sizes"] for m in await _accepted(sim.client, "+15550000002")] == [
            [len(PNG)]
        ]


@pytest.mark.anyio
async def test_a_file_that_cannot_be_fetched_is_sent_without_it() -> None:
    """As Telnyx documents an unreachable media URL: the MMS is accepted and goes out
    without the file (its size null), its outcome unchanged."""
    async with media_host() as (host, files), running() as sim:
        unreachable = sim.sim_url.rsplit(":", 1)[0] + ":9/nothing.png"
        urls = [f"{files}/flyer.png", f"{files}/missing.png", f"{files}/huge.png", unreachable]
        answer = await sim.send(text="Flyers", media_urls=urls)
        assert answer.status_code == 200, answer.text
        assert sorted(host.hits) == ["flyer.png", "huge.png", "missing.png"]
        [listed] = await _accepted(sim.client, MEMBER)
        assert listed["media_sizes"] == [len(PNG), None, None, None]
        hooks = await sim.receiver.wait_for(2)
        final = next(h for h in hooks if h["data"]["event_type"] == "message.finalized")
        payload = final["data"]["payload"]
        assert payload["to"][0]["status"] == "delivered"
        assert [m["size"] for m in payload["media"]] == [len(PNG), None, None, None]
        lookup = await sim.client.get(f"/v2/messages/{payload['id']}", headers=AUTH)
        assert [m["size"] for m in lookup.json()["data"]["media"]] == [len(PNG), None, None, None]


@pytest.mark.anyio
async def test_bad_media_urls_are_refused_as_telnyx_does_and_nothing_is_listed() -> None:
    async with running() as sim:
        too_many = await sim.send(media_urls=[f"https://example.org/{i}.png" for i in range(11)])
        assert too_many.status_code == 422
        assert too_many.json()["errors"][0]["source"]["pointer"] == "/media_urls"
        relative = await sim.send(media_urls=["/media/flyer.png"])
        assert relative.status_code == 400
        [err] = relative.json()["errors"]
        assert (err["code"], err["source"]["pointer"]) == ("10003", "/media_urls/0")
        assert await _accepted(sim.client, MEMBER) == []
        bad_to = await sim.client.get("/_sim/messages", params={"to": "0123"})
        assert bad_to.status_code == 422


@pytest.mark.anyio
async def test_inbound_media_are_served_and_sent_in_telnyx_shape() -> None:
    async with running() as sim:
        body = {
            "from": MEMBER,
            "to": CHURCH,
            "text": "Look!",
            "media": [
                {"content_type": "image/png", "data_base64": base64.b64encode(PNG).decode()},
                {"content_type": "image/jpeg", "data_base64": base64.b64encode(JPEG).decode()},
            ],
        }
        answer = await sim.client.post("/_sim/inbound", json=body)
        assert answer.status_code == 202, answer.text
        [event] = await sim.receiver.wait_for(1)
        payload = event["data"]["payload"]
        assert (payload["type"], payload["text"], payload["parts"]) == ("MMS", "Look!", 1)
        media = payload["media"]
        assert [{k: v for k, v in m.items() if k != "url"} for m in media] == [
            {"content_type": "image/png", "size": len(PNG), "hash_sha256": _sha(PNG)},
            {"content_type": "image/jpeg", "size": len(JPEG), "hash_sha256": _sha(JPEG)},
        ]
        for item, data in zip(media, (PNG, JPEG), strict=True):
            assert item["url"].startswith(f"{sim.sim_url}/_sim/media/")
            served = await sim.client.get(item["url"])
            assert served.status_code == 200
            assert (served.content, served.headers["content-type"]) == (
                data,
                item["content_type"],
            )
        assert (await sim.client.get("/_sim/media/not-a-token")).status_code == 404

        # Files alone are an MMS too; nothing at all, or a file that is not base64, is not.
        only = {"from": MEMBER, "to": CHURCH, "media": body["media"][:1]}
        assert (await sim.client.post("/_sim/inbound", json=only)).status_code == 202
        [_, second] = await sim.receiver.wait_for(2)
        assert (second["data"]["payload"]["text"], len(second["data"]["payload"]["media"])) == (
            "",
            1,
        )
        nothing = {"from": MEMBER, "to": CHURCH, "media": []}
        assert (await sim.client.post("/_sim/inbound", json=nothing)).status_code == 422
        garbled = {**only, "media": [{"content_type": "image/png", "data_base64": "@@@"}]}
        bad = await sim.client.post("/_sim/inbound", json=garbled)
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["source"]["pointer"] == "/media/0"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_served_files_expire_and_are_bounded() -> None:
    store = InboundMediaStore(ttl_s=60, max_bytes=10)
    store.add("a", "image/png", b"12345", now=0)
    store.add("b", "image/png", b"12345", now=1)
    assert store.get("a", now=59) is not None
    assert store.get("a", now=60) is None  # expired: 404, as a provider's old link
    store.add("c", "image/png", b"123456", now=61)  # over 10 bytes: the oldest goes
    assert store.get("b", now=61) is None
    assert store.get("c", now=61) is not None


def test_accepted_sends_are_bounded_per_destination_and_in_all() -> None:
    log = AcceptedLog(per_destination=2, max_sends=3)

    def send(to: str, text: str) -> AcceptedSend:
        return AcceptedSend(CHURCH, to, text, (), ())

    for text in ("1", "2", "3"):
        log.remember(send(MEMBER, text))
    assert [s.text for s in log.for_destination(MEMBER)] == ["2", "3"]
    log.remember(send("+15550000001", "a"))
    log.remember(send("+15550000002", "b"))  # a fourth send: the stalest number goes
    assert log.for_destination(MEMBER) == []
    assert [s.text for s in log.for_destination("+15550000002")] == ["b"]
    log.clear()
    assert log.for_destination("+15550000001") == []
