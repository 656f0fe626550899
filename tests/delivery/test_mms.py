"""MMS on the send pipeline: a broadcast's and a staff reply's files reach the provider
(the simulator, which fetches them as a carrier does) as signed, expiring links; and
texts with media take the account's MMS tokens as well (docs/protocol.md "Media (MMS)")."""

from __future__ import annotations

import time
import uuid
from typing import Any, cast

import httpx
import msgspec
import pytest

from delivery.throttle import ACCOUNT, MMS, Throttle
from deploy.stack import Stack
from storage.process.services import Services
from storage.process.settings import Settings
from storage.redis import key_names
from storage.redis.send_limits import ProviderLimits, account_id
from tests.api.test_media import SAMPLES
from tests.conftest import Church, stack_redis, texted_in, unique_phone, wait_until


def upload(church: Church, kind: str) -> dict[str, Any]:
    answer = church.api.post("/v1/media", files={"file": ("f", SAMPLES[kind], "text/plain")})
    assert answer.status_code == 201, answer.text
    data: dict[str, Any] = answer.json()["data"]
    return data


def accepted_for(sim_url: str, phone: str, media: bool) -> list[dict[str, Any]]:
    """What the simulator accepted for ``phone`` (only sends with media, or without)."""
    answer = httpx.get(f"{sim_url}/_sim/messages", params={"to": phone})
    assert answer.status_code == 200, answer.text
    sends: list[dict[str, Any]] = answer.json()
    return [s for s in sends if bool(s["media_urls"]) == media]


def check_links(
    stack: Stack, church: Church, send: dict[str, Any], files: list[dict[str, Any]]
) -> None:
    """The provider got one absolute, expiring link per file, in order, and fetched them."""
    public = stack.env["KOINONIA_PUBLIC_URL"].rstrip("/")
    assert len(send["media_urls"]) == len(files)
    for url, size, item in zip(send["media_urls"], send["media_sizes"], files, strict=True):
        assert url.startswith(f"{public}/media/{church.id}/{item['id']}?expires="), url
        expires = int(url.split("expires=")[1].split("&")[0])
        # On the lifetime's grid: between one and two lifetimes ahead (the same for
        # every attempt within a window).
        assert time.time() + 3600 - 5 <= expires <= time.time() + 2 * 3600 + 5
        assert expires % 3600 == 0
        assert size == item["size"]
        fetched = httpx.get(url)
        assert fetched.status_code == 200
        assert fetched.content == SAMPLES[item["content_type"]]


def test_a_broadcast_with_media_reaches_the_provider_with_links(
    church: Church, stack: Stack, sim_url: str
) -> None:
    group = church.group("Flyers")
    phones = [unique_phone(), unique_phone()]
    for phone in phones:
        church.member(phone, [group])
    files = [upload(church, "image/jpeg"), upload(church, "application/pdf")]
    provider = Settings.from_env(stack.env).provider
    mms_bucket = key_names.send_bucket(account_id(provider), "mms")
    before_ms = int(time.time() * 1000)
    answer = church.api.post(
        "/v1/messages",
        json={
            "body": "Hi {{first_name}}, the flyer",
            "target": {"group_ids": [group]},
            "media_ids": [f["id"] for f in files],
        },
    )
    assert answer.status_code == 202, answer.text
    counts = church.counts_when(answer.json()["data"]["id"], lambda c: c["delivered"] == 2)
    assert counts["delivered"] == 2, counts
    for phone in phones:
        (send,) = accepted_for(sim_url, phone, media=True)
        assert send["text"] == "Hi Ada, the flyer"
        check_links(stack, church, send, files)
    # The worker took the account's MMS tokens for them (the bucket's last take).
    with stack_redis(stack) as redis:
        taken_ms = redis.hget(mms_bucket, "ts")
    assert taken_ms is not None
    assert int(cast(bytes, taken_ms)) >= before_ms  # Redis's clock is this machine's


def test_a_staff_reply_with_media_reaches_the_member(
    church: Church, stack: Stack, sim_url: str
) -> None:
    phone = unique_phone()
    _, conversation = texted_in(church, sim_url, phone)
    item = upload(church, "image/png")
    reply = church.api.post(
        f"/v1/conversations/{conversation}/messages", json={"media_ids": [item["id"]]}
    )
    assert reply.status_code == 202, reply.text
    message = reply.json()["data"]
    assert message["body"] == ""
    assert message["media"] == [item]

    found: list[dict[str, Any]] = []

    def arrived() -> bool:
        found[:] = accepted_for(sim_url, phone, media=True)
        return bool(found)

    wait_until(arrived, 15, "the reply with media reached the simulator")
    (send,) = found
    assert send["text"] in ("", None)
    check_links(stack, church, send, [item])
    thread = church.api.get(f"/v1/conversations/{conversation}/messages").json()["data"]
    assert thread[0]["id"] == message["id"]
    assert thread[0]["media"] == [item]
    # The thread's url is the staff's: it opens the file with the church's credentials.
    opened = church.api.get(item["url"])
    assert opened.status_code == 200
    assert opened.content == SAMPLES["image/png"]


@pytest.mark.anyio
async def test_texts_with_media_also_take_the_accounts_mms_tokens(stack: Stack) -> None:
    """Against the stack's Redis: an MMS batch is admitted by the account's MMS bucket
    too, in the account's hash tag (one script with the account's bucket), while SMS
    from the same number and account go on; refunds go back to the MMS bucket."""
    settings = Settings.from_env(stack.env)
    delivery = msgspec.structs.replace(
        settings.delivery,
        rate_per_account=1000.0,
        rate_per_number=1000.0,
        mms_rate_per_account=4.0,
        rate_burst_s=1.0,
    )
    services = await Services.open(settings)
    try:
        limits = ProviderLimits(services.scripts, f"test-{uuid.uuid4().hex[:12]}")
        throttle = Throttle(limits, delivery, probe_ms=1000)
        number = unique_phone()
        buckets = throttle.buckets(number, mms=True)
        assert [b.key for b in buckets[:2]] == [b.key for b in throttle.buckets(number)]
        assert key_names.hash_tag(buckets[MMS].key) == key_names.hash_tag(limits.circuit_key)
        assert key_names.hash_tag(buckets[ACCOUNT].key) == key_names.hash_tag(limits.circuit_key)

        first = await throttle.admit(number, 10, mms=True)
        assert first.granted == 4, first
        held = await throttle.admit(number, 10, mms=True)
        assert (held.granted, held.limited_by) == (0, MMS), held
        assert 0 < held.wait_s <= 0.5
        sms = await throttle.admit(number, 10)
        assert sms.granted == 10, sms
        await throttle.refund(number, 4, mms=True)
        again = await throttle.admit(number, 10, mms=True)
        assert again.granted == 4, again
    finally:
        await services.redis.delete(*(b.key for b in throttle.buckets(number, mms=True)))
        await services.close()
