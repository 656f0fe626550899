"""Media (MMS): uploads judged by content, reads scoped to the church, the provider's
signed link, and media_ids on sends (docs/protocol.md "Media (MMS)")."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import httpx

from deploy.stack import Stack
from storage.domain.media_links import MediaLinks
from storage.domain.media_types import MAX_MEDIA_BYTES
from tests.conftest import Church, texted_in, unique_phone

SAMPLES: dict[str, bytes] = {
    "image/jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4,
    "image/png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\r\n\x00\xff" * 100,
    "image/gif": b"GIF89a\x01\x00\x01\x00" + b"\x00" * 50,
    "video/mp4": b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00" + b"\x00" * 200,
    "audio/mpeg": b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 50,
    "text/vcard": b"BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Ada Lovelace\r\nEND:VCARD\r\n",
    "application/pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n",
}


def upload(
    client: httpx.Client, data: bytes, name: str = "file.bin", declared: str = "text/plain"
) -> httpx.Response:
    # The name and the declared type are deliberately wrong: only the bytes count.
    return client.post("/v1/media", files={"file": (name, data, declared)})


def uploaded(church: Church, kind: str = "image/png") -> dict[str, Any]:
    answer = upload(church.api, SAMPLES[kind])
    assert answer.status_code == 201, answer.text
    data: dict[str, Any] = answer.json()["data"]
    return data


def link(stack: Stack, church_id: str, media_id: str, expires: int) -> str:
    """The provider's link as the stack's own key signs it."""
    links = MediaLinks(base64.b64decode(stack.env["KOINONIA_LOOKUP_KEY"]))
    return links.make(
        stack.env["KOINONIA_PUBLIC_URL"], uuid.UUID(church_id), uuid.UUID(media_id), expires
    )


def test_each_allowed_type_is_judged_by_its_content(church: Church) -> None:
    for kind, data in SAMPLES.items():
        answer = upload(church.api, data)
        assert answer.status_code == 201, (kind, answer.text)
        item = answer.json()["data"]
        assert item["content_type"] == kind
        assert item["size"] == len(data)
        assert item["url"].endswith(f"/v1/media/{item['id']}/content")
        assert church.api.get(f"/v1/media/{item['id']}").json()["data"] == item
        content = church.api.get(f"/v1/media/{item['id']}/content")
        assert content.status_code == 200
        assert content.content == data
        assert content.headers["content-type"].startswith(kind)
        assert content.headers["x-content-type-options"] == "nosniff"
        assert content.headers["cache-control"].startswith("private")
        disposition = content.headers["content-disposition"]
        assert disposition.startswith("inline" if kind.startswith("image/") else "attachment")


def test_refused_uploads_answer_their_codes(church: Church, base_url: str) -> None:
    text = upload(church.api, b"#!/bin/sh\necho not an image\n", "flyer.jpg", "image/jpeg")
    assert text.status_code == 415, text.text
    assert text.json()["error"]["code"] == "unsupported_media_type"
    empty = upload(church.api, b"", "flyer.png", "image/png")
    assert empty.status_code == 415, empty.text
    missing = church.api.post("/v1/media", files={"other": ("a.png", SAMPLES["image/png"])})
    assert missing.status_code == 422, missing.text
    assert missing.json()["error"]["details"][0]["field"] == "file"
    as_json = church.api.post("/v1/media", json={"file": "x"})
    assert as_json.status_code == 415, as_json.text
    # Only the church's credentials open the upload and the files.
    anonymous = httpx.post(f"{base_url}/v1/media", files={"file": ("a.png", SAMPLES["image/png"])})
    assert anonymous.status_code == 401


def chunked(client: httpx.Client, data: bytes) -> httpx.Response:
    """An upload that does not declare its length (chunked): only the route's own
    reading can refuse it."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return client.post(
        "/v1/media",
        content=(body[i : i + 65536] for i in range(0, len(body), 65536)),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )


def test_the_size_limit_is_the_carriers(church: Church) -> None:
    jpeg = SAMPLES["image/jpeg"]
    largest = jpeg + b"\x00" * (MAX_MEDIA_BYTES - len(jpeg))
    answer = chunked(church.api, largest)
    assert answer.status_code == 201, answer.text[:300]
    assert answer.json()["data"]["size"] == MAX_MEDIA_BYTES
    content = church.api.get(f"/v1/media/{answer.json()['data']['id']}/content")
    assert content.content == largest
    for refused in (largest + b"\x00", largest * 3):
        answer = chunked(church.api, refused)
        assert answer.status_code == 413, answer.text[:300]
        assert answer.json()["error"]["code"] == "payload_too_large"
    # As browsers and HTTP libraries send it, with its length declared: the body is
    # larger than the API's usual limit, and the file still fits.
    answer = upload(church.api, largest, "big.jpg", "image/jpeg")
    assert answer.status_code == 201, answer.text[:300]
    assert answer.json()["data"]["size"] == MAX_MEDIA_BYTES
    larger = upload(church.api, largest + b"\x00", "big.jpg", "image/jpeg")
    assert larger.status_code == 413, larger.text[:300]
    assert larger.json()["error"]["code"] == "payload_too_large"


def test_another_churchs_media_is_not_found_anywhere(
    church: Church, other_church: Church, base_url: str, sim_url: str
) -> None:
    theirs = uploaded(other_church)
    for path in (f"/v1/media/{theirs['id']}", f"/v1/media/{theirs['id']}/content"):
        answer = church.api.get(path)
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["error"]["code"] == "not_found"
    assert church.api.get(f"/v1/media/{uuid.uuid4()}").status_code == 404
    assert church.api.get("/v1/media/not-a-uuid").status_code == 404
    # The content needs credentials like every /v1 read.
    anonymous = httpx.get(f"{base_url}/v1/media/{theirs['id']}/content")
    assert anonymous.status_code == 401

    group = church.group("Media")
    church.member(unique_phone(), [group])
    send = church.api.post(
        "/v1/messages",
        json={"body": "Flyer", "target": {"group_ids": [group]}, "media_ids": [theirs["id"]]},
    )
    assert send.status_code == 404, send.text
    assert church.api.get("/v1/messages").json()["data"] == []

    _, conversation = texted_in(church, sim_url)
    before = church.api.get(f"/v1/conversations/{conversation}/messages").json()["data"]
    reply = church.api.post(
        f"/v1/conversations/{conversation}/messages", json={"media_ids": [theirs["id"]]}
    )
    assert reply.status_code == 404, reply.text
    after = church.api.get(f"/v1/conversations/{conversation}/messages").json()["data"]
    assert after == before


def test_sends_take_media_ids_and_show_them(church: Church) -> None:
    group = church.group("Flyers")
    church.member(unique_phone(), [group])
    mine = [uploaded(church, kind)["id"] for kind in ("image/png", "application/pdf")]
    target = {"group_ids": [group]}

    too_many = church.api.post(
        "/v1/messages", json={"target": target, "media_ids": [str(uuid.uuid4())] * 11}
    )
    assert too_many.status_code == 422, too_many.text
    assert too_many.json()["error"]["details"][0]["field"] == "media_ids"
    repeated = church.api.post("/v1/messages", json={"target": target, "media_ids": [mine[0]] * 2})
    assert repeated.status_code == 422, repeated.text
    empty = church.api.post("/v1/messages", json={"target": target, "body": ""})
    assert empty.status_code == 422, empty.text
    assert church.api.get("/v1/messages").json()["data"] == []

    only_files = church.api.post("/v1/messages", json={"target": target, "media_ids": mine})
    assert only_files.status_code == 202, only_files.text
    accepted = only_files.json()["data"]
    assert accepted["media_ids"] == mine
    detail = church.api.get(f"/v1/messages/{accepted['id']}").json()["data"]
    assert (detail["body"], detail["media_ids"]) == ("", mine)
    listed = church.api.get("/v1/messages").json()["data"]
    assert [(m["id"], m["media_ids"]) for m in listed] == [(accepted["id"], mine)]
    sms = church.api.post("/v1/messages", json={"target": target, "body": "Plain"})
    assert sms.json()["data"]["media_ids"] == []


def test_the_providers_link_works_until_it_expires(church: Church, stack: Stack) -> None:
    item = uploaded(church, "image/gif")
    good = link(stack, church.id, item["id"], int(time.time()) + 60)
    # No credentials: the link is its own.
    answer = httpx.get(good)
    assert answer.status_code == 200, answer.text
    assert answer.content == SAMPLES["image/gif"]
    assert answer.headers["content-type"] == "image/gif"
    assert answer.headers["cache-control"].startswith("private")

    expired = httpx.get(link(stack, church.id, item["id"], int(time.time()) - 1))
    assert expired.status_code == 403, expired.text
    assert expired.json()["error"]["code"] == "forbidden"
    longer = good.replace("expires=", "expires=9")
    # A digit that is not ASCII ("²" passes str.isdigit) is refused, not a 500.
    assert httpx.get(good.replace("expires=", "expires=%C2%B2")).status_code == 403
    tampered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    for bad in (longer, tampered, good.split("&signature=")[0]):
        answer = httpx.get(bad)
        assert answer.status_code == 403, (bad, answer.text)
    other = uploaded(church, "image/png")
    moved = good.replace(item["id"], other["id"])
    assert httpx.get(moved).status_code == 403
    unknown = httpx.get(link(stack, church.id, str(uuid.uuid4()), int(time.time()) + 60))
    assert unknown.status_code == 404, unknown.text


def test_an_object_store_failure_is_unavailable_not_an_error(church: Church, stack: Stack) -> None:
    """The provider's link (outside /v1) answers a failing store as every /v1 read does:
    503 ``unavailable``; a file gone from the store is not found."""
    item = uploaded(church, "image/png")
    stored = stack.data_dir.resolve() / "objects" / "media" / church.id / f"{item['id']}.png"
    assert stored.read_bytes() == SAMPLES["image/png"]
    url = link(stack, church.id, item["id"], int(time.time()) + 60)
    stored.unlink()
    stored.symlink_to(stored.name)  # a link to itself: every read of it fails
    try:
        for answer in (httpx.get(url), church.api.get(f"/v1/media/{item['id']}/content")):
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "unavailable"
    finally:
        stored.unlink()
    for answer in (httpx.get(url), church.api.get(f"/v1/media/{item['id']}/content")):
        assert answer.status_code == 404, answer.text
