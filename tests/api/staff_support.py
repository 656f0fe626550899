"""Helpers for the staff and auth tests: the outbox, invitations, extra sessions."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import httpx
import psycopg

from deploy.stack import Stack
from tests.conftest import Church

PASSWORD = "correct horse battery"
_TOKEN = re.compile(r"token=([A-Za-z0-9_-]+)")


def new_email(who: str = "staff") -> str:
    return f"{who}-{uuid.uuid4().hex[:12]}@example.org"


def sql(stack: Stack, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement against the stack's Postgres (autocommit); rows if any."""
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def outbox_mail(stack: Stack, email: str, kind: str, *, count: int = 1, seconds: float = 10) -> Any:
    """The newest mail of ``kind`` to ``email`` once at least ``count`` exist
    (subject, body, status, created_at); fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        rows = sql(
            stack,
            "SELECT subject, body, status, created_at FROM mail_outbox "
            "WHERE lower(recipient) = lower(%s) AND kind = %s ORDER BY created_at DESC, id DESC",
            (email, kind),
        )
        if len(rows) >= count:
            return rows[0]
        assert time.monotonic() < deadline, f"no {kind} mail to {email} (found {len(rows)})"
        time.sleep(0.05)


def token_in(body: str, page: str, base_url: str) -> str:
    """The token of the ``<public_url>/<page>?token=...`` link, which the mail also
    carries on its own."""
    match = _TOKEN.search(body)
    assert match, body
    token = match.group(1)
    assert f"{base_url}/{page}?token={token}" in body, body
    assert f"\n{token}\n" in body, body
    return token


def invite(church: Church, stack: Stack, base_url: str, email: str, role: str) -> str:
    """Invite ``email`` as ``role`` from the church owner's session; the mailed token."""
    answer = church.session.post("/v1/invitations", json={"email": email, "role": role})
    assert answer.status_code == 201, answer.text
    _, body, status, _ = outbox_mail(stack, email, "invitation")
    assert status == "stored"
    return token_in(body, "accept-invitation", base_url)


def browser(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=10.0)


def with_csrf(client: httpx.Client) -> httpx.Client:
    """Echo the CSRF cookie, as the browser app does."""
    client.headers["X-CSRF-Token"] = client.cookies["koinonia_csrf"]
    return client


def accept(base_url: str, token: str, name: str = "") -> tuple[httpx.Client, dict[str, Any]]:
    """Accept an invitation in a fresh browser; its signed-in client and the answer data."""
    client = browser(base_url)
    answer = client.post(
        "/v1/invitations/accept", json={"token": token, "password": PASSWORD, "name": name}
    )
    assert answer.status_code == 201, answer.text
    return with_csrf(client), answer.json()["data"]


def join(
    church: Church, stack: Stack, base_url: str, role: str, name: str = ""
) -> tuple[httpx.Client, dict[str, Any]]:
    """A new staff user of ``church`` with ``role``, signed in: (client, user)."""
    email = new_email(role)
    client, data = accept(base_url, invite(church, stack, base_url, email, role), name)
    return client, data["user"]


def login(base_url: str, email: str, password: str = PASSWORD) -> httpx.Client:
    client = browser(base_url)
    answer = client.post("/v1/auth/login", json={"email": email, "password": password})
    assert answer.status_code == 200, answer.text
    return with_csrf(client)


def error_of(answer: httpx.Response) -> tuple[int, str]:
    return answer.status_code, answer.json()["error"]["code"]
