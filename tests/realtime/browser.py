"""A real headless Chromium for the page tests: Debian's ``chromium`` package,
driven by Playwright (no browser downloads; ``.ci/run`` installs the package).

Each browser context is a fresh, separate profile (its own cookie jar), so two
contexts are two staff sessions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, WebSocketRoute, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium() -> Iterator[Browser]:
    """Launch Chromium (with a fresh temporary profile); fails when it is not installed."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: the browser tests need Debian's chromium package "
            "(apt-get install chromium; .ci/run installs it when missing)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


class Tab:
    """One page in its own context, remembering the errors it logged."""

    def __init__(self, browser: Browser, base_url: str) -> None:
        self.context: BrowserContext = browser.new_context(base_url=base_url)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on(
            "console",
            lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None,
        )

    def sign_in(self, path: str, email: str, password: str) -> None:
        """Open a page while signed out and sign in through its form."""
        page = self.page
        page.goto(path)
        form = page.locator("#login-form")
        form.wait_for(state="visible")
        form.locator("input[name=email]").fill(email)
        form.locator("input[name=password]").fill(password)
        form.locator("button[type=submit]").click()
        page.locator("#app").wait_for(state="visible")
        # Left on window: if the page reloads at any point, it is gone.
        page.evaluate("window.__noReload = true")

    def still_same_page(self) -> bool:
        return bool(self.page.evaluate("window.__noReload === true"))

    def script_errors(self) -> list[str]:
        """Errors other than failed resource loads (the signed-out /v1/me answers 401)."""
        return [e for e in self.errors if "Failed to load resource" not in e]

    def close(self) -> None:
        self.context.close()


class SocketRelay:
    """Routes a page's ``/v1/realtime`` sockets through Playwright to the real
    server: records the frames both ways, and can cut the connection and refuse
    new ones for a while, as a network outage would. Set it up before the page
    opens its socket."""

    def __init__(self, page: Page) -> None:
        self.from_page: list[dict[str, Any]] = []
        self.to_page: list[dict[str, Any]] = []
        self.blocked = False
        self._open: list[WebSocketRoute] = []
        page.route_web_socket(re.compile(r"/v1/realtime$"), self._route)

    def _route(self, page_side: WebSocketRoute) -> None:
        if self.blocked:
            page_side.close(code=1013, reason="outage")
            return
        server_side = page_side.connect_to_server()

        def upstream(frame: str | bytes) -> None:
            self.from_page.append(json.loads(frame))
            server_side.send(frame)

        def downstream(frame: str | bytes) -> None:
            self.to_page.append(json.loads(frame))
            page_side.send(frame)

        page_side.on_message(upstream)
        server_side.on_message(downstream)
        self._open.append(page_side)

    def cut(self) -> None:
        """Close the open connections and refuse new ones until ``restore()``."""
        self.blocked = True
        for route in self._open:
            route.close(code=1001, reason="outage")
        self._open.clear()

    def restore(self) -> None:
        self.blocked = False
