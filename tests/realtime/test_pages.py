"""The staff pages in a real headless Chromium against the whole stack:
``/inbox`` (a member's reply arrives live, staff answer it, typing shows to a
colleague) and ``/dashboard`` (a broadcast's progress bar reaches 100 %).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, expect

from realtime.pages import STATIC_DIR
from tests.conftest import Church, texts_sent, unique_phone
from tests.realtime.browser import SocketRelay, Tab, chromium

# Slow lane: a real browser (chromium).
pytestmark = pytest.mark.slow


PASSWORD = "correct horse battery"

expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def tabs() -> Iterator[list[Tab]]:
    opened: list[Tab] = []
    yield opened
    for tab in opened:
        tab.close()


def open_tab(tabs: list[Tab], browser: Browser, base_url: str) -> Tab:
    tab = Tab(browser, base_url)
    tabs.append(tab)
    return tab


def text_in(sim_url: str, member_phone: str, church_phone: str, text: str) -> None:
    """A member's text reaching the church, through the provider simulator."""
    answer = httpx.post(
        f"{sim_url}/_sim/inbound", json={"from": member_phone, "to": church_phone, "text": text}
    )
    assert answer.status_code < 300, answer.text


def test_pages_and_assets_are_served_with_a_strict_policy(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        for path in ("/inbox", "/dashboard"):
            page = client.get(path)
            assert page.status_code == 200, path
            assert page.headers["content-type"].startswith("text/html")
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert "<script>" not in page.text  # no inline code: the policy forbids it
        icon = client.get("/static/favicon.svg")
        assert icon.headers["content-type"] == "image/svg+xml"
        asset = client.get("/static/app.js")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith("text/javascript")
        again = client.get("/static/app.js", headers={"If-None-Match": asset.headers["etag"]})
        assert again.status_code == 304
        for missing in ("/static/nope.js", "/static/..%2Fpages.py", "/static/inbox.html"):
            assert client.get(missing).status_code == 404, missing
    # Nothing is loaded from elsewhere: no CDN, no web fonts.
    for file in STATIC_DIR.iterdir():
        text = re.sub(r'xmlns="[^"]*"', "", file.read_text())  # a name, not a download
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), file


def test_inbox_shows_replies_live_recovers_after_an_outage_and_sends_the_answer(
    church: Church, browser: Browser, base_url: str, sim_url: str, tabs: list[Tab]
) -> None:
    phone = unique_phone()
    church.member(phone)
    staff = open_tab(tabs, browser, base_url)
    relay = SocketRelay(staff.page)
    staff.sign_in("/inbox", church.email, PASSWORD)
    page = staff.page
    connection = page.locator("#connection")
    expect(connection).to_have_attribute("data-state", "live")
    expect(page.locator("#no-conversations")).to_be_visible()

    text_in(sim_url, phone, church.phone_number, "Can I bring a friend Sunday?")
    row = page.locator("#conversations li")
    expect(row).to_have_count(1)
    expect(row).to_have_attribute("data-unread", "1")
    expect(row.locator(".badge")).to_have_text("1")
    expect(row.locator(".name")).to_have_text("Ada Lovelace")

    # The connection drops; a second reply lands meanwhile; the page reconnects,
    # resubscribes from the last event it saw and gets the missed events replayed.
    relay.cut()
    expect(connection).to_have_attribute("data-state", "offline")
    text_in(sim_url, phone, church.phone_number, "Also, is there parking?")
    deadline = time.monotonic() + 10
    while church.conversations_when(1)[0]["unread_count"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    relay.restore()
    expect(connection).to_have_attribute("data-state", "live")
    expect(row).to_have_attribute("data-unread", "2")
    resubscribe = [
        f for f in relay.from_page if f["type"] == "subscribe" and f["channel"] == "inbox"
    ][-1]
    assert set(resubscribe["since"]) == {"offset", "epoch"}
    answers = [f for f in relay.to_page if f["type"] == "subscribed" and f["channel"] == "inbox"]
    assert answers[-1]["recovered"] is True

    row.locator("button").click()
    thread = page.locator("#messages li")
    expect(thread).to_have_count(2)
    expect(thread.locator(".body")).to_have_text(
        ["Can I bring a friend Sunday?", "Also, is there parking?"]
    )
    expect(thread.first).to_have_attribute("data-direction", "inbound")
    expect(row).to_have_attribute("data-unread", "0")  # opening it read it
    expect(row.locator(".badge")).to_be_hidden()

    page.locator("#reply-body").fill("Of course, see you at 10!")
    page.locator("#reply button[type=submit]").click()
    sent = page.locator("#messages li[data-direction=outbound]")
    expect(sent).to_have_count(1)
    expect(sent.locator(".body")).to_have_text("Of course, see you at 10!")
    expect(page.locator("#reply-body")).to_have_value("")

    deadline = time.monotonic() + 15
    while texts_sent(sim_url, [phone]) != [1] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert texts_sent(sim_url, [phone]) == [1]
    expect(sent).to_have_attribute("data-status", re.compile("^(sent|delivered)$"))
    assert staff.still_same_page()
    assert staff.script_errors() == []


def test_inbox_shows_a_colleague_typing(
    church: Church, browser: Browser, base_url: str, sim_url: str, tabs: list[Tab]
) -> None:
    phone = unique_phone()
    church.member(phone, first_name="Grace", last_name="Hopper")
    text_in(sim_url, phone, church.phone_number, "Hi")
    church.conversations_when(1)

    # The same user signed in twice: two sessions, two sockets.
    writer, watcher = (open_tab(tabs, browser, base_url) for _ in range(2))
    for tab in (writer, watcher):
        tab.sign_in("/inbox", church.email, PASSWORD)
        expect(tab.page.locator("#connection")).to_have_attribute("data-state", "live")
        tab.page.locator("#conversations li button").click()
        expect(tab.page.locator("#messages li .body")).to_have_text("Hi")
    typing = watcher.page.locator("#typing")
    expect(typing).to_be_hidden()

    writer.page.locator("#reply-body").press_sequentially("On my way", delay=20)
    expect(typing).to_be_visible()
    expect(typing).to_contain_text("typing")
    expect(writer.page.locator("#typing")).to_be_hidden()  # not one's own typing
    expect(typing).to_be_hidden(timeout=8_000)  # about 4 s after the last signal

    # The answer reaches the colleague's open thread live too.
    writer.page.locator("#reply-body").press("Enter")
    expect(watcher.page.locator("#messages li[data-direction=outbound] .body")).to_have_text(
        "On my way"
    )
    assert watcher.still_same_page()
    assert writer.script_errors() == []
    assert watcher.script_errors() == []


def test_dashboard_progress_reaches_100_percent(
    church: Church, browser: Browser, base_url: str, tabs: list[Tab]
) -> None:
    group = church.group("Youth")
    for _ in range(20):
        church.member(unique_phone(), [group])
    staff = open_tab(tabs, browser, base_url)
    staff.sign_in("/dashboard", church.email, PASSWORD)
    page = staff.page
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#no-broadcasts")).to_be_visible()

    message_id = church.broadcast(group, "Youth night moved to Friday")
    row = page.locator(f"#broadcasts li[data-message-id='{message_id}']")
    expect(row).to_be_visible()  # from message.created, live
    expect(row.locator(".body")).to_have_text("Youth night moved to Friday")
    bar = row.locator("[role=progressbar]")
    expect(bar).to_have_attribute("aria-valuenow", "100", timeout=30_000)
    expect(row).to_have_attribute("data-percent", "100")
    expect(row).to_have_attribute("data-status", "completed")
    expect(row.locator(".summary")).to_contain_text("20 of 20 done")
    assert church.counts_when(message_id, lambda c: c["delivered"] == 20)["delivered"] == 20
    assert staff.still_same_page()
    assert staff.script_errors() == []
