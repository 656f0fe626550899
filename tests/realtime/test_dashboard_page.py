"""``/dashboard`` in a real headless Chromium against the whole stack: the composer's
segment counter passes the server's test vectors, the estimate shows before sending,
a sent broadcast shows its progress, its estimate and a delivery chart, media attach
with a thumbnail and go to the provider, a refused file shows the server's error,
and keywords are added, refused and deleted.

One browser, one church and one signed-in tab serve the whole module; the tests run
in order on that shared state.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import FilePayload, Page, expect

from tests.conftest import Church, unique_phone, wait_until
from tests.realtime.browser import Tab, chromium

# Slow lane: a real browser (chromium).
pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "segments.json"

expect.set_options(timeout=15_000)

Paint = Callable[[int, int], tuple[int, int, int]]


@dataclass
class Dashboard:
    church: Church
    tab: Tab
    group: str
    phones: list[str]
    sim_url: str

    @property
    def page(self) -> Page:
        return self.tab.page


def png(width: int = 48, height: int = 32, paint: Paint | None = None) -> bytes:
    """A real PNG (RGB, 8 bits) whose pixel (x, y) is ``paint(x, y)``, a gradient by
    default: what the browser shows and the server's sniffing accepts."""

    def gradient(x: int, y: int) -> tuple[int, int, int]:
        return (x * 5 % 256, y * 7 % 256, 160)

    colour = paint or gradient

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    rows = b"".join(
        b"\x00" + b"".join(bytes(colour(x, y)) for x in range(width)) for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def dashboard(base_url: str, sim_url: str) -> Iterator[Dashboard]:
    church = Church(base_url)
    group = church.group("Choir")
    phones = [unique_phone() for _ in range(3)]
    for n, phone in enumerate(phones):
        church.member(phone, [group], first_name=f"Singer{n}", last_name="Choir")
    with chromium() as browser:
        tab = Tab(browser, base_url)
        tab.sign_in("/dashboard", church.email, PASSWORD)
        expect(tab.page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(tab.page.locator("#group-options li")).to_have_count(1)
        yield Dashboard(church, tab, group, phones, sim_url)
        assert tab.still_same_page()
        assert tab.script_errors() == []
        tab.close()
    church.close()


def choose_choir(page: Page) -> None:
    page.get_by_role("radio", name="Groups").check()
    page.locator("#group-options").get_by_role("checkbox").check()


def test_the_counter_passes_every_segment_vector(dashboard: Dashboard) -> None:
    cases: list[dict[str, Any]] = json.loads(VECTORS.read_text())["cases"]
    page = dashboard.page
    # The module itself, as the page loads it...
    counted = page.evaluate(
        """async (texts) => {
            const { countSegments } = await import("/static/segments.js");
            return texts.map((text) => countSegments(text));
        }""",
        [case["text"] for case in cases],
    )
    # ...and the counter the composer shows as the body is typed.
    shown = page.evaluate(
        """(texts) => texts.map((text) => {
            const box = document.querySelector("#body");
            box.value = text;
            box.dispatchEvent(new Event("input", { bubbles: true }));
            const counter = document.querySelector("#counter");
            const { encoding, segments } = counter.dataset;
            return { encoding, segments: Number(segments) };
        })""",
        [case["text"] for case in cases],
    )
    for case, module, composer in zip(cases, counted, shown, strict=True):
        expected = {"encoding": case["encoding"], "segments": case["segments"]}
        why = case.get("why", repr(case["text"][:20]))
        assert {k: module[k] for k in expected} == expected, why
        assert composer == expected, why
    assert len(counted) == len(cases) > 30

    box = page.locator("#body")
    box.fill("Rehearsal moved to 7 \u2013 see you there")  # an en dash is not GSM-7
    expect(page.locator("#counter-encoding")).to_have_text("UCS-2")
    expect(page.locator("#ucs2-note")).to_contain_text("\u2013")
    box.fill("")
    expect(page.locator("#counter-units")).to_have_text("0 / 160")
    expect(page.locator("#ucs2-note")).to_be_hidden()


def test_the_audience_picker_changes_the_estimate(dashboard: Dashboard) -> None:
    page = dashboard.page
    estimate = page.locator("#estimate")
    page.locator("#body").fill("Hello {{first_name}}")
    page.get_by_role("radio", name="Everyone").check()
    expect(estimate).to_have_attribute("data-recipients", "3")
    page.get_by_role("radio", name="People").check()
    expect(estimate).to_have_attribute("data-state", "idle")  # nobody chosen yet
    page.get_by_role("searchbox", name="Find people").fill("singer1")
    page.locator("#member-options").get_by_role("button", name="Singer1 Choir").click()
    expect(page.locator("#member-chosen li")).to_have_count(1)
    expect(estimate).to_have_attribute("data-recipients", "1")
    expect(estimate.locator(".recipients")).to_have_text("1 person")
    page.get_by_role("button", name="Remove Singer1 Choir").click()
    expect(estimate).to_have_attribute("data-state", "idle")
    page.locator("#body").fill("")


def test_a_refused_send_shows_the_envelope_and_its_fields(dashboard: Dashboard) -> None:
    page = dashboard.page
    page.get_by_role("radio", name="Groups").check()  # and no group ticked
    page.locator("#body").fill("Choir practice tonight")
    page.locator("#send").click()
    error = page.locator("#composer-error")
    expect(error).to_be_visible()
    expect(error).to_have_attribute("role", "alert")
    expect(page.locator("#composer-error-details li")).to_contain_text(["Audience"])
    assert dashboard.church.api.get("/v1/messages").json()["data"] == []
    page.locator("#body").fill("")


def test_compose_estimate_send_then_progress_and_chart(dashboard: Dashboard) -> None:
    page = dashboard.page
    choose_choir(page)
    page.locator("#body").fill("Hi {{first_name}}, choir practice is at 7 tonight.")
    estimate = page.locator("#estimate")
    expect(estimate).to_have_attribute("data-state", "ready")
    expect(estimate).to_have_attribute("data-recipients", "3")
    expect(estimate.locator(".recipients")).to_have_text("3 people")
    expect(estimate.locator(".finishes")).to_contain_text("done by")
    expect(page.locator("#send")).to_have_text("Send to 3 people")

    page.locator("#send").click()
    expect(page.locator("#composer-done")).to_have_text("On its way to 3 people.")
    expect(page.locator("#body")).to_have_value("")
    (sent,) = dashboard.church.api.get("/v1/messages").json()["data"]
    row = page.locator(f"#broadcasts li[data-message-id='{sent['id']}']")
    expect(row.locator(".body")).to_have_text("Hi {{first_name}}, choir practice is at 7 tonight.")
    expect(row).to_have_attribute("data-status", "completed", timeout=30_000)
    expect(row.locator(".summary")).to_contain_text("3 of 3 done")
    expect(row.locator(".eta")).to_contain_text("finished")
    chart = row.locator(".chart")
    expect(chart).not_to_have_attribute("data-points", "0")
    # Running totals: the delivered line ends at the top, all 3 delivered.
    wait_until(
        lambda: str(row.locator("polyline.delivered").get_attribute("points")).endswith(",2.0"),
        seconds=10,
        what="the chart's delivered line reaches the recipient count",
    )

    # A scheduled broadcast shows when it will be done before it starts.
    choose_choir(page)
    page.locator("#body").fill("Carol service on Sunday")
    page.locator("#schedule-on").check()
    at = datetime.now().replace(second=0, microsecond=0) + timedelta(days=2)
    page.locator("#send-at").fill(at.strftime("%Y-%m-%dT%H:%M"))
    expect(page.locator("#send")).to_have_text("Schedule")
    expect(estimate).to_have_attribute("data-state", "ready")
    page.locator("#send").click()
    expect(page.locator("#composer-done")).to_contain_text("Scheduled for")
    scheduled = next(
        m for m in dashboard.church.api.get("/v1/messages").json()["data"] if m["id"] != sent["id"]
    )
    assert scheduled["status"] == "scheduled"
    assert datetime.fromisoformat(scheduled["send_at"]) == at.astimezone(UTC)
    later = page.locator(f"#broadcasts li[data-message-id='{scheduled['id']}']")
    expect(later.locator(".eta")).to_contain_text("done by")
    assert dashboard.church.api.post(f"/v1/messages/{scheduled['id']}/cancel").is_success


def test_a_picture_attaches_with_a_thumbnail_and_goes_with_the_text(
    dashboard: Dashboard,
) -> None:
    page = dashboard.page
    choose_choir(page)
    page.locator("#body").fill("The new choir robes!")
    page.locator("#attach").set_input_files(
        files=[FilePayload(name="robes.png", mimeType="image/png", buffer=png())]
    )
    thumb = page.locator("#attachments li img.thumb")
    expect(thumb).to_be_visible()
    expect(thumb).to_have_attribute("alt", "robes.png")
    # The thumbnail is the stored file, read back with the staff session.
    wait_until(
        lambda: bool(thumb.evaluate("img => img.complete && img.naturalWidth === 48")),
        seconds=10,
        what="thumbnail loaded",
    )
    media_id = page.locator("#attachments li").get_attribute("data-media-id")
    assert media_id
    expect(page.locator("#estimate")).to_have_attribute("data-state", "ready")
    page.locator("#send").click()
    expect(page.locator("#composer-done")).to_have_text("On its way to 3 people.")
    expect(page.locator("#attachments li")).to_have_count(0)

    def received() -> list[dict[str, Any]]:
        answer = httpx.get(f"{dashboard.sim_url}/_sim/messages", params={"to": dashboard.phones[0]})
        answer.raise_for_status()
        found: list[dict[str, Any]] = answer.json()
        return [m for m in found if m["media_urls"]]

    wait_until(lambda: len(received()) == 1, seconds=20, what="the MMS reached the simulator")
    (mms,) = received()
    assert mms["text"] == "The new choir robes!"
    assert mms["media_sizes"] == [len(png())]


def test_refused_files_show_the_servers_messages(dashboard: Dashboard) -> None:
    page = dashboard.page
    notes = b"just some words, not a picture\n"
    huge = png() + b"\0" * (1_048_576 + 1)  # a PNG by its first bytes, over the limit
    error = page.locator("#media-error")
    for name, data, status in (("notes.png", notes, 415), ("huge.png", huge, 413)):
        direct = dashboard.church.api.post("/v1/media", files={"file": (name, data, "image/png")})
        assert direct.status_code == status, direct.text
        page.locator("#attach").set_input_files(
            files=[FilePayload(name=name, mimeType="image/png", buffer=data)]
        )
        expect(error).to_be_visible()
        expect(error).to_have_text(f"{name}: {direct.json()['error']['message']}")
        expect(page.locator("#attachments li")).to_have_count(0)


def test_keywords_are_added_refused_and_deleted(dashboard: Dashboard) -> None:
    page = dashboard.page
    form = page.locator("#keyword-form")
    rows = page.locator("#keywords li")
    expect(page.locator("#no-keywords")).to_be_visible()
    form.get_by_label("Keyword").fill("Sing")
    form.get_by_label("Group").select_option(value=dashboard.group)
    form.get_by_label("Reply").fill("Welcome to the choir!")
    form.get_by_role("button", name="Add keyword").click()
    expect(rows).to_have_count(1)
    expect(rows.locator(".word")).to_have_text("SING")
    expect(rows.locator(".group")).to_have_text("joins Choir")
    expect(form.get_by_label("Keyword")).to_have_value("")

    error = page.locator("#keyword-error")
    form.get_by_label("Keyword").fill("SING")  # unique whatever its case
    form.get_by_label("Reply").fill("Again")
    form.get_by_role("button", name="Add keyword").click()
    expect(error).to_be_visible()
    duplicate = dashboard.church.api.post(
        "/v1/keywords", json={"keyword": "sing", "group_id": dashboard.group, "reply": "x"}
    )
    assert duplicate.status_code == 409
    expect(page.locator("#keyword-error-message")).to_have_text(
        duplicate.json()["error"]["message"]
    )

    form.get_by_label("Keyword").fill("STOP")  # the opt-out word
    form.get_by_role("button", name="Add keyword").click()
    expect(page.locator("#keyword-error-details li")).to_have_count(1)
    expect(page.locator("#keyword-error-details li")).to_contain_text("Keyword")
    expect(rows).to_have_count(1)

    rows.get_by_role("button", name="Delete keyword Sing").click()
    expect(rows).to_have_count(0)
    expect(page.locator("#no-keywords")).to_be_visible()
    assert dashboard.church.api.get("/v1/keywords").json()["data"] == []
