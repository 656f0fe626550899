"""The ``/operations`` page in a real headless Chromium against the whole stack: an
owner sees both scopes labelled, small SVG charts that grow with every reading and
show a broadcast's sends; a staff user is told the page is for owners.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Locator, expect

from deploy.stack import Stack
from tests.api.staff_support import PASSWORD, join
from tests.conftest import Church, unique_phone
from tests.realtime.browser import Tab, chromium

# Slow lane: a real browser (chromium).
pytestmark = pytest.mark.slow

expect.set_options(timeout=20_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def tab(browser: Browser, base_url: str) -> Iterator[Tab]:
    opened = Tab(browser, base_url)
    yield opened
    opened.close()


def points(chart: Locator) -> int:
    """Points drawn by the chart's first line, counted in its ``points`` attribute."""
    drawn = chart.locator("polyline").first.get_attribute("points") or ""
    return len(drawn.split())


def test_the_page_is_served_like_the_others(base_url: str) -> None:
    page = httpx.get(base_url + "/operations")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text
    assert "<svg" in page.text
    for asset in ("/static/operations.js", "/static/operations.css"):
        assert httpx.get(base_url + asset).status_code == 200, asset


def test_an_owner_watches_live_charts_of_both_scopes(
    church: Church, tab: Tab, base_url: str
) -> None:
    group = church.group("Deacons")
    for _ in range(3):
        church.member(unique_phone(), [group])
    tab.sign_in("/operations", church.email, PASSWORD)
    page = tab.page
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    # Both scopes, labelled; the node names itself.
    expect(page.locator("[data-scope-label=deployment]")).to_contain_text("deployment-wide")
    node_label = page.locator("[data-scope-label=node]")
    expect(node_label).to_contain_text("this node only")
    expect(node_label).to_contain_text(re.compile(r"pid \d+"))

    # Every chart is inline SVG drawn with a polyline; readings accumulate.
    sent = page.locator("figure[data-chart=sent]")
    queue = page.locator("figure[data-chart=queue]")
    expect(page.locator("figure.chart svg polyline")).to_have_count(9)
    expect(queue).to_have_attribute("data-points", re.compile(r"^([2-9]|\d\d)$"))
    before = points(sent)
    assert before >= 1
    expect(queue.locator("output")).to_have_text(re.compile(r"^\d+$"))

    metrics = page.locator("#metrics-off").is_hidden()
    requests = page.locator("figure[data-chart=requests]")
    if metrics:
        # The node's rates need two readings; the page's own polls are requests.
        expect(requests).to_have_attribute("data-latest", re.compile(r"^[0-9.]*[1-9]"))
        expect(page.locator("figure[data-chart=p95] output")).to_have_text(re.compile(r" ms$"))
    else:
        expect(page.locator("#metrics-off")).to_contain_text("metrics off on this node")

    # A broadcast: the deployment's sends chart rises, and keeps growing. (The
    # figure is deployment-wide over 60 s, so other tests' sends may have raised it
    # already: wait for a reading taken after this point, not for a non-zero one.)
    church.broadcast(group, "Deacons meet Tuesday")
    expect(sent).not_to_have_attribute("data-points", str(before))
    expect(sent).to_have_attribute("data-latest", re.compile(r"^[0-9.]*[1-9]"))
    expect(sent.locator("output")).to_have_text(re.compile(r"/s$"))
    grown = points(sent)
    expect(sent).not_to_have_attribute("data-points", str(grown))
    assert points(page.locator("figure[data-chart=finalized]")) > before
    assert tab.script_errors() == []
    assert tab.still_same_page()

    # The dashboard links here for owners.
    page.goto("/dashboard")
    expect(page.locator("nav a[href='/operations']")).to_be_visible()


def test_staff_are_told_it_is_for_owners(
    church: Church, tab: Tab, stack: Stack, base_url: str
) -> None:
    staff, user = join(church, stack, base_url, "staff")
    staff.close()
    tab.sign_in("/operations", user["email"], PASSWORD)
    page = tab.page
    expect(page.locator("#forbidden")).to_be_visible()
    expect(page.locator("section.scope").first).to_be_hidden()
    page.goto("/dashboard")
    page.locator("#app").wait_for(state="visible")
    expect(page.locator("nav a[href='/operations']")).to_be_hidden()
