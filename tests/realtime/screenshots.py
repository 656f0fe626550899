"""Screenshots of the staff pages for the README, with ``koinonia demo`` data.

Starts a whole stack of its own (as ``koinonia dev`` does, on free ports, in a
temporary folder), builds a demo church with ``koinonia demo``, signs in as its
owner in headless Chromium (tests/realtime/browser.py) at 1440x900, and saves

- ``<out>/inbox.png``: /inbox with the most recent conversation open;
- ``<out>/dashboard.png``: /dashboard with the composer filled in (a group, a
  text with a merge field, a picture) and its estimate shown.

    uv run python -m tests.realtime.screenshots --out docs/screenshots

Progress on stderr; the stack is stopped and its folder removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page, ViewportSize, expect

from deploy.stack import Stack, free_ports
from tests.realtime.browser import Tab, chromium
from tests.realtime.test_dashboard_page import png

ROOT = Path(__file__).resolve().parents[2]
VIEWPORT = ViewportSize(width=1440, height=900)
TEXT = (
    "Hi {{first_name}}! Choir rehearsal moves to Thursday at 7 pm this week, "
    "in the fellowship hall. Bring your Christmas music. See you there!"
)


def sunset(x: int, y: int) -> tuple[int, int, int]:
    """A picture to attach: a sun going down over a hill."""
    if (x - 300) ** 2 + (y - 170) ** 2 < 55**2:
        return (255, 214, 120)
    if y > 230 + ((x - 240) ** 2) // 900:
        return (46, 74, 60)
    t = y / 320
    return (int(250 - 90 * t), int(140 - 80 * t), int(90 + 70 * t))


def say(text: str) -> None:
    print(f"screenshots: {text}", file=sys.stderr, flush=True)


def demo_church(stack: Stack, members: int, months: int) -> dict[str, str]:
    uv = shutil.which("uv")
    command = [uv, "run", "--no-sync", "koinonia"] if uv else [sys.executable, "-m", "deploy.cli"]
    done = subprocess.run(
        [*command, "demo", "--members", str(members), "--months", str(months)],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        sys.exit(f"screenshots: koinonia demo failed:\n{done.stderr}")
    created: dict[str, str] = json.loads(done.stdout)
    return created


def sign_in(page: Page, email: str, password: str) -> None:
    page.goto("/dashboard")
    form = page.locator("#login-form")
    form.wait_for(state="visible")
    form.locator("input[name=email]").fill(email)
    form.locator("input[name=password]").fill(password)
    form.locator("button[type=submit]").click()
    page.locator("#app").wait_for(state="visible")


def shoot_inbox(page: Page, path: Path) -> None:
    page.goto("/inbox")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    first = page.locator("#conversations li button").first
    first.wait_for(state="visible")
    first.click()
    page.locator("#messages li").first.wait_for(state="visible")
    page.wait_for_timeout(600)  # thumbnails and the contact panel
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.screenshot(path=str(path))


def shoot_dashboard(page: Page, path: Path, picture: Path) -> None:
    page.goto("/dashboard")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    page.locator("#broadcasts li").first.wait_for(state="visible")
    page.get_by_role("radio", name="Groups").check()
    page.locator("#group-options input[type=checkbox]").first.check()
    page.locator("#body").fill(TEXT)
    page.locator("#attach").set_input_files(str(picture))
    page.locator("#attachments li img.thumb").wait_for(state="visible")
    expect(page.locator("#estimate")).to_have_attribute("data-state", "ready")
    # The charts of the rows on screen come after their analytics.
    expect(page.locator("#broadcasts li .chart").first).not_to_have_attribute("data-points", "0")
    page.wait_for_timeout(600)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.screenshot(path=str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--members", type=int, default=300, help="demo members (300)")
    parser.add_argument("--months", type=int, default=12, help="demo months of history (12)")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=30_000)

    data_dir = Path(tempfile.mkdtemp(prefix="koinonia-screenshots-"))
    web_port, sim_port = free_ports(2)
    stack = Stack(
        data_dir,
        http_port=web_port,
        sim_port=sim_port,
        env={**os.environ, "KOINONIA_LOG_LEVEL": "WARNING"},
        fast_unsafe=True,
        quiet=True,
        log_dir=data_dir / "logs",
    )
    started = time.monotonic()
    try:
        say(f"starting a stack in {data_dir}")
        stack.start_stores()
        stack.start_processes()
        stack.wait_ready()
        say(f"building the demo church ({args.members} members, {args.months} months)")
        login = demo_church(stack, args.members, args.months)
        say(f"signing in as {login['email']}")
        picture = data_dir / "choir.png"
        picture.write_bytes(png(480, 320, sunset))
        with chromium() as browser:
            tab = Tab(browser, f"http://127.0.0.1:{web_port}")
            tab.page.set_viewport_size(VIEWPORT)
            sign_in(tab.page, login["email"], login["password"])
            shoot_inbox(tab.page, out / "inbox.png")
            say(f"saved {out / 'inbox.png'}")
            shoot_dashboard(tab.page, out / "dashboard.png", picture)
            say(f"saved {out / 'dashboard.png'}")
            errors = tab.script_errors()
            tab.close()
        if errors:
            say("the pages logged errors: " + "; ".join(errors))
        say(f"done in {time.monotonic() - started:.0f} s")
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
