"""``/inbox`` in a real headless Chromium, two staff of one church side by side
(two browser contexts: the owner and Ana, an agent): who views a conversation,
the warning when both start answering it, notes drawn apart from texts and never
texted, the canned-reply picker (``/``) with merge fields filled by the server,
pictures texted in and attached to a reply (MMS), the contact panel with the
broadcasts received, search, and assignment.

One browser, one church and the two signed-in tabs serve the whole module; the
tests run in order on that shared state.
"""

from __future__ import annotations

import base64
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from playwright.sync_api import FilePayload, Page, WebSocketRoute, expect

from deploy.stack import Stack
from tests.api.staff_support import join
from tests.conftest import Church, texts_sent, unique_phone
from tests.realtime.browser import SocketRelay, Tab, chromium

# Slow lane: a real browser (chromium).
pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"

expect.set_options(timeout=15_000)

BROADCASTS = 11
"""Texts Grace got before the pages opened: the choir's broadcasts, for her contact panel
(one more than its first page)."""


@dataclass
class Inbox:
    church: Church
    owner: Tab
    owner_socket: ClosingRelay
    ana: Tab
    ana_id: str
    owner_name: str
    phone: str
    """Grace Hopper's phone; her conversation is the first in the list."""
    sim_url: str


class ClosingRelay(SocketRelay):
    """A SocketRelay whose cut also closes the server's side, as a dropped network
    would end the connection there too (the plain relay leaves it open)."""

    def __init__(self, page: Page) -> None:
        self._servers: list[WebSocketRoute] = []
        super().__init__(page)

    def _route(self, page_side: WebSocketRoute) -> None:
        connect = page_side.connect_to_server

        def connect_and_keep() -> WebSocketRoute:
            server_side = connect()
            self._servers.append(server_side)
            return server_side

        page_side.connect_to_server = connect_and_keep  # type: ignore[method-assign]
        super()._route(page_side)

    def cut(self) -> None:
        for route in self._servers:
            route.close(code=1000, reason="outage")
        self._servers.clear()
        super().cut()


def text_in(sim_url: str, member_phone: str, church_phone: str, text: str) -> None:
    answer = httpx.post(
        f"{sim_url}/_sim/inbound", json={"from": member_phone, "to": church_phone, "text": text}
    )
    assert answer.status_code < 300, answer.text


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A real PNG of one colour (what a browser decodes and the server sniffs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def row_of(page: Page, name: str) -> Any:
    return page.locator("#conversations li").filter(has=page.locator(".name", has_text=name))


@pytest.fixture(scope="module")
def inbox(stack: Stack, base_url: str, sim_url: str) -> Iterator[Inbox]:
    church = Church(base_url)
    _, ana = join(church, stack, base_url, "staff", name="Ana")
    owner_name = next(
        u["name"] or u["email"]
        for u in church.session.get("/v1/staff").json()["data"]
        if u["id"] == church.user_id
    )
    choir = church.group("Choir")
    phone = unique_phone()
    church.member(phone, [choir], first_name="Grace", last_name="Hopper")
    sent = [church.broadcast(choir, f"Rehearsal note {n}") for n in range(1, BROADCASTS)]
    sent.append(church.broadcast(choir, "Choir robes on Sunday, {{first_name}}!"))
    for broadcast in sent:
        counts = church.counts_when(broadcast, lambda c: c["delivered"] == 1)
        assert counts["delivered"] == 1, counts
    text_in(sim_url, phone, church.phone_number, "Is choir practice on tonight?")
    church.conversations_when(1)
    with chromium() as browser:
        owner, ana_tab = Tab(browser, base_url), Tab(browser, base_url)
        relay = ClosingRelay(owner.page)
        owner.sign_in("/inbox", church.email, PASSWORD)
        ana_tab.sign_in("/inbox", ana["email"], PASSWORD)
        for tab in (owner, ana_tab):
            expect(tab.page.locator("#connection")).to_have_attribute("data-state", "live")
            row_of(tab.page, "Grace Hopper").locator("button").click()
            expect(tab.page.locator("#messages li .body")).to_have_text(
                "Is choir practice on tonight?"
            )
        yield Inbox(church, owner, relay, ana_tab, str(ana["id"]), owner_name, phone, sim_url)
        for tab in (owner, ana_tab):
            assert tab.still_same_page()
            assert tab.script_errors() == []
            tab.close()
    church.close()


def test_each_sees_the_other_viewing_and_a_warning_when_both_answer(inbox: Inbox) -> None:
    owner, ana = inbox.owner.page, inbox.ana.page
    expect(owner.locator("#viewers")).to_have_text("Ana is viewing")
    expect(ana.locator("#viewers")).to_have_text(f"{inbox.owner_name} is viewing")
    expect(row_of(ana, "Grace Hopper").locator(".watching")).to_have_text(
        f"{inbox.owner_name} viewing"
    )
    presence = inbox.church.session.get("/v1/presence").json()["data"]
    assert set(presence["online"]) >= {inbox.church.user_id, inbox.ana_id}
    (viewed,) = presence["viewers"].values()
    assert set(viewed) == {inbox.church.user_id, inbox.ana_id}

    collision = owner.locator("#collision")
    owner.locator("#reply-body").press_sequentially("Yes, at 7", delay=10)
    expect(collision).to_be_hidden()  # nobody else is writing
    ana.locator("#reply-body").press_sequentially("I think", delay=10)
    expect(collision).to_be_visible()
    expect(collision).to_have_text("Ana is also replying")
    expect(collision).to_have_attribute("role", "alert")
    # The warning is about this user's reply: with the box emptied, it goes.
    owner.locator("#reply-body").fill("")
    expect(collision).to_be_hidden()
    ana.locator("#reply-body").fill("")

    # Leaving the conversation (another one opens) ends "viewing" for the others.
    other_phone = unique_phone()
    inbox.church.member(other_phone, first_name="Linus", last_name="Torvalds")
    text_in(inbox.sim_url, other_phone, inbox.church.phone_number, "Where do I park?")
    row_of(ana, "Linus Torvalds").locator("button").click()
    expect(owner.locator("#viewers")).to_be_hidden()
    row_of(ana, "Grace Hopper").locator("button").click()
    expect(owner.locator("#viewers")).to_have_text("Ana is viewing")


def test_viewing_is_told_again_after_a_reconnect(inbox: Inbox) -> None:
    """The server forgets what a closed connection viewed; the page says it again."""
    owner, ana = inbox.owner.page, inbox.ana.page
    viewing = ana.locator("#viewers")
    expect(viewing).to_have_text(f"{inbox.owner_name} is viewing")
    inbox.owner_socket.cut()
    expect(owner.locator("#connection")).to_have_attribute("data-state", "offline")
    expect(viewing).to_be_hidden()
    inbox.owner_socket.restore()
    expect(owner.locator("#connection")).to_have_attribute("data-state", "live")
    expect(viewing).to_have_text(f"{inbox.owner_name} is viewing")
    told = [f for f in inbox.owner_socket.from_page if f["type"] == "viewing"]
    assert len(told) >= 2
    assert told[-1]["conversation_id"] == told[0]["conversation_id"]


def test_a_note_is_drawn_apart_with_its_author_and_never_texted(inbox: Inbox) -> None:
    owner, ana = inbox.owner.page, inbox.ana.page
    owner.get_by_label("Add note").check()
    expect(owner.locator("#reply")).to_have_attribute("data-mode", "note")
    owner.locator("#reply-body").fill("Her daughter sings alto")
    owner.locator("#reply button[type=submit]").click()
    for page in (owner, ana):
        note = page.locator("#messages li[data-direction=note]")
        expect(note).to_have_count(1)
        expect(note.locator(".body")).to_have_text("Her daughter sings alto")
        expect(note.locator(".note-label")).to_have_text(f"Note {inbox.owner_name}")
    expect(owner.locator("#messages li[data-direction=outbound]")).to_have_count(0)
    # Give a wrongly texted note the time a text takes to reach the simulator.
    time.sleep(1)
    assert texts_sent(inbox.sim_url, [inbox.phone]) == [BROADCASTS]
    owner.locator("#reply input[name=mode][value=reply]").check()
    expect(owner.locator("#reply")).to_have_attribute("data-mode", "reply")


def test_the_canned_reply_picker_sends_it_filled_for_the_member(inbox: Inbox) -> None:
    made = inbox.church.api.post(
        "/v1/canned-replies",
        json={"name": "Practice times", "body": "Hi {{first_name}}! Practice is at 7 pm."},
    )
    assert made.status_code == 201, made.text
    assert inbox.church.api.post(
        "/v1/canned-replies", json={"name": "Directions", "body": "We meet at 12 Main St."}
    ).is_success
    owner, ana = inbox.owner.page, inbox.ana.page
    box = owner.locator("#reply-body")
    box.press_sequentially("/pract", delay=10)
    picker = owner.locator("#canned")
    expect(picker).to_be_visible()
    expect(picker.get_by_role("option")).to_have_count(1)
    expect(picker.get_by_role("option")).to_contain_text("Practice times")
    box.press("Enter")  # chooses
    expect(picker).to_be_hidden()
    expect(owner.locator("#canned-chosen .name")).to_have_text("Practice times")
    box.press("Enter")  # sends
    for page in (owner, ana):
        expect(page.locator("#messages li[data-direction=outbound] .body")).to_have_text(
            "Hi Grace! Practice is at 7 pm."
        )
    expect(owner.locator("#canned-chosen")).to_be_hidden()
    deadline = time.monotonic() + 15
    while (
        texts_sent(inbox.sim_url, [inbox.phone]) != [BROADCASTS + 1] and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert texts_sent(inbox.sim_url, [inbox.phone]) == [BROADCASTS + 1]


def test_a_picture_texted_in_shows_live_as_a_thumbnail_that_opens_full_size(
    inbox: Inbox,
) -> None:
    picture = png(40, 30, (200, 40, 40))
    sent = httpx.post(
        f"{inbox.sim_url}/_sim/inbound",
        json={
            "from": inbox.phone,
            "to": inbox.church.phone_number,
            "text": "Our flyer",
            "media": [
                {"content_type": "image/png", "data_base64": base64.b64encode(picture).decode()}
            ],
        },
    )
    assert sent.status_code < 300, sent.text
    for page in (inbox.owner.page, inbox.ana.page):
        message = page.locator("#messages li[data-direction=inbound]").filter(has_text="Our flyer")
        thumb = message.locator(".media-thumb img")
        expect(thumb).to_have_count(1)
        # Loaded through the staff session: the browser decoded the real picture.
        expect(thumb).to_have_js_property("naturalWidth", 40)
    page = inbox.owner.page
    page.locator("#messages .media-thumb").last.click()
    viewer = page.locator("#media-viewer")
    expect(viewer).to_be_visible()
    expect(viewer.locator("img")).to_have_js_property("naturalHeight", 30)
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()


def test_staff_attach_a_picture_and_the_member_gets_it_as_an_mms(inbox: Inbox) -> None:
    owner, ana = inbox.owner.page, inbox.ana.page
    picture = png(64, 48, (30, 90, 200))
    owner.locator("#attach-input").set_input_files(
        files=[FilePayload(name="event.png", mimeType="image/png", buffer=picture)]
    )
    pending = owner.locator("#pending-files li")
    expect(pending).to_have_count(1)
    expect(pending).to_have_attribute("data-state", "ready")
    expect(pending.locator(".file-name")).to_have_text("event.png")
    expect(pending.locator("img")).to_have_js_property("naturalWidth", 64)
    owner.locator("#reply-body").fill("See you there")
    owner.locator("#reply button[type=submit]").click()
    expect(owner.locator("#pending-files")).to_be_hidden()
    for page in (owner, ana):
        message = page.locator("#messages li[data-direction=outbound]").filter(
            has_text="See you there"
        )
        expect(message.locator(".media-thumb img")).to_have_js_property("naturalWidth", 64)
    accepted: list[dict[str, Any]] = []

    def fetched() -> bool:
        answer = httpx.get(f"{inbox.sim_url}/_sim/messages", params={"to": inbox.phone})
        listed = answer.json()
        accepted[:] = [m for m in listed if m["text"] == "See you there"]
        return bool(accepted)

    deadline = time.monotonic() + 15
    while not fetched() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert accepted, "the simulator never got the MMS"
    (mms,) = accepted
    assert len(mms["media_urls"]) == 1
    assert mms["media_sizes"] == [len(picture)]


def test_a_file_that_is_not_what_its_name_says_is_refused_with_the_servers_reason(
    inbox: Inbox,
) -> None:
    page = inbox.owner.page
    fake = b"Just a note, not a picture.\n"
    expected = inbox.church.api.post("/v1/media", files={"file": ("notes.png", fake, "image/png")})
    assert expected.status_code == 415, expected.text
    reason = expected.json()["error"]["message"]
    page.locator("#attach-input").set_input_files(
        files=[FilePayload(name="notes.png", mimeType="image/png", buffer=fake)]
    )
    error = page.locator("#reply-error")
    expect(error).to_be_visible()
    expect(error).to_have_text(f"“notes.png” not attached: {reason}")
    expect(page.locator("#pending-files")).to_be_hidden()
    expect(page.locator("#reply-body")).to_have_attribute("required", "")

    # Over the carriers' limit: the server's 413, in its words.
    big = png(8, 8, (0, 0, 0)) + bytes(1_048_576)
    expected = inbox.church.api.post("/v1/media", files={"file": ("big.png", big, "image/png")})
    assert expected.status_code == 413, expected.text
    reason = expected.json()["error"]["message"]
    page.locator("#attach-input").set_input_files(
        files=[FilePayload(name="big.png", mimeType="image/png", buffer=big)]
    )
    expect(error).to_have_text(f"“big.png” not attached: {reason}")
    expect(page.locator("#pending-files")).to_be_hidden()


def test_the_contact_panel_lists_the_broadcasts_received(inbox: Inbox) -> None:
    page = inbox.ana.page
    # Open the conversation again: the panel is read after the replies were sent.
    row_of(page, "Linus Torvalds").locator("button").click()
    expect(page.locator("#contact-name")).to_have_text("Linus Torvalds")
    expect(page.locator("#received-none")).to_be_visible()
    row_of(page, "Grace Hopper").locator("button").click()
    received = page.locator("#received li")
    expect(received).to_have_count(10)  # the first page
    newest = received.first
    expect(newest.locator(".received-body")).to_have_text(
        "Choir robes on Sunday, {{first_name}}!"  # as written: merge fields unfilled
    )
    expect(newest.locator(".status-chip")).to_have_text("Delivered")
    expect(newest.locator(".status-chip")).to_have_attribute("data-status", "delivered")
    expect(newest.locator("time")).not_to_be_empty()
    more = page.locator("#received-more")
    more.click()
    expect(received).to_have_count(BROADCASTS)
    expect(received.last.locator(".received-body")).to_have_text("Rehearsal note 1")
    expect(more).to_be_hidden()
    # The replies she got (a canned reply, a picture) are in the thread, not listed here.
    expect(page.locator("#messages li[data-direction=outbound]")).to_have_count(2)
    expect(received.filter(has_text="See you there")).to_have_count(0)


def test_the_contact_panel_shows_opt_in_and_groups(inbox: Inbox) -> None:
    page = inbox.ana.page
    expect(page.locator("#contact")).to_be_visible()
    expect(page.locator("#contact-name")).to_have_text("Grace Hopper")
    expect(page.locator("#contact-phone")).not_to_be_empty()
    optin = page.locator("#contact-optin")
    expect(optin).to_contain_text("Opted in")
    expect(optin).to_contain_text("through the API")  # added with the church's API key
    expect(optin).to_contain_text(re.compile(r"\d{4}"))  # and when
    expect(page.locator("#contact-groups li")).to_have_text(["Choir"])
    # Opting out (by STOP) shows once the text arrives.
    text_in(inbox.sim_url, inbox.phone, inbox.church.phone_number, "STOP")
    expect(optin).to_contain_text("Opted out")


def test_search_replaces_the_list_and_clearing_restores_it(inbox: Inbox) -> None:
    page = inbox.owner.page
    rows = page.locator("#conversations li")
    expect(rows).to_have_count(2)
    search = page.get_by_role("searchbox", name="Search conversations")
    search.fill("torvalds")
    expect(rows).to_have_count(1)
    expect(rows.locator(".name")).to_have_text("Linus Torvalds")
    expect(page.locator("#search-status")).to_contain_text("1 conversation matches")
    search.fill("park")  # a word of a message
    expect(rows.locator(".name")).to_have_text("Linus Torvalds")
    search.fill("nobody-by-that-name")
    expect(rows).to_have_count(0)
    expect(page.locator("#search-status")).to_contain_text("No conversations match")
    search.fill("")
    expect(rows).to_have_count(2)
    expect(page.locator("#search-status")).to_be_hidden()


def test_assignment_shows_on_both_pages(inbox: Inbox) -> None:
    owner, ana = inbox.owner.page, inbox.ana.page
    owner.locator("#assignee").select_option(value=inbox.ana_id)
    expect(row_of(owner, "Grace Hopper").locator(".assignee")).to_have_text("Assigned to Ana")
    expect(row_of(ana, "Grace Hopper").locator(".assignee")).to_have_text("Assigned to me")
    expect(ana.locator("#assignee")).to_have_value(inbox.ana_id)
    (conversation,) = [
        c
        for c in inbox.church.api.get("/v1/conversations").json()["data"]
        if c["assignee_id"] is not None
    ]
    assert conversation["assignee_id"] == inbox.ana_id

    ana.locator("#assignee").select_option(value="")
    expect(row_of(owner, "Grace Hopper").locator(".assignee")).to_be_hidden()
    expect(owner.locator("#assignee")).to_have_value("")
