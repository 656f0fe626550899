"""Passwords, sessions, cookies, password reset, login limits and the mailer."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.responses import Response

from api.sessions import set_session_cookies
from deploy.embedded import free_port
from deploy.stack import Stack
from storage.pg.database import Pool, open_pool
from storage.process.mail import Mail, Mailer, parse_smtp_url
from storage.process.settings import DatabaseSettings, HttpSettings, MailSettings
from tests.api.staff_support import (
    PASSWORD,
    browser,
    error_of,
    join,
    login,
    new_email,
    outbox_mail,
    sql,
    token_in,
)
from tests.conftest import Church

NEW_PASSWORD = "a brand new passphrase"


def _reset(base_url: str, email: str) -> Any:
    return browser(base_url).post("/v1/auth/password-reset", json={"email": email})


def _confirm(base_url: str, token: str, password: str = NEW_PASSWORD) -> Any:
    return browser(base_url).post(
        "/v1/auth/password-reset/confirm", json={"token": token, "password": password}
    )


def _password_hash(stack: Stack, user_id: str) -> str:
    return str(sql(stack, "SELECT password_hash FROM staff_user WHERE id = %s", (user_id,))[0][0])


# -- password reset -------------------------------------------------------------------


def test_password_reset_flow(church: Church, stack: Stack, base_url: str) -> None:
    other_session = login(base_url, church.email)
    old_hash = _password_hash(stack, church.user_id)

    answer = _reset(base_url, church.email.upper())
    assert answer.status_code == 202, answer.text
    subject, body, status, _ = outbox_mail(stack, church.email, "password_reset")
    assert status == "stored"
    assert "password" in subject.lower()
    token = token_in(body, "reset-password", base_url)
    rows = sql(
        stack,
        "SELECT expires_at - created_at, used_at FROM password_reset WHERE user_id = %s",
        (church.user_id,),
    )
    assert rows[0][0] == dt.timedelta(hours=1)
    assert rows[0][1] is None

    confirmed = _confirm(base_url, token)
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["data"] == {"password_changed": True, "sessions_ended": 2}
    new_hash = _password_hash(stack, church.user_id)
    assert new_hash != old_hash
    assert new_hash.startswith("$argon2id$")

    # Every session of the user ended; the old password fails, the new one works.
    for client in (church.session, other_session):
        assert error_of(client.get("/v1/me")) == (401, "unauthorized")
    old = browser(base_url).post(
        "/v1/auth/login", json={"email": church.email, "password": PASSWORD}
    )
    assert error_of(old) == (401, "unauthorized")
    login(base_url, church.email, NEW_PASSWORD).close()

    # Single use.
    again = _confirm(base_url, token, "yet another passphrase")
    assert error_of(again) == (422, "validation_error")
    assert again.json()["error"]["details"][0]["field"] == "token"
    other_session.close()


def test_reset_answers_the_same_for_unknown_emails(
    church: Church, stack: Stack, base_url: str
) -> None:
    unknown = new_email("nobody")
    known = _reset(base_url, church.email)
    missing = _reset(base_url, unknown)
    assert known.status_code == missing.status_code == 202
    assert known.json()["data"] == missing.json()["data"]
    assert set(known.headers) == set(missing.headers)
    assert sorted(known.cookies.keys()) == sorted(missing.cookies.keys()) == []
    outbox_mail(stack, church.email, "password_reset")
    assert sql(stack, "SELECT 1 FROM mail_outbox WHERE recipient = %s", (unknown,)) == []


def test_reset_token_expires_and_bad_tokens_fail(
    church: Church, stack: Stack, base_url: str
) -> None:
    assert _reset(base_url, church.email).status_code == 202
    _, body, _, _ = outbox_mail(stack, church.email, "password_reset")
    token = token_in(body, "reset-password", base_url)
    sql(
        stack,
        "UPDATE password_reset SET expires_at = now() - interval '1 second' WHERE user_id = %s",
        (church.user_id,),
    )
    for bad in (token, "not-a-token", token[:-1]):
        answer = _confirm(base_url, bad)
        assert error_of(answer) == (422, "validation_error")
        assert answer.json()["error"]["details"][0]["field"] == "token"
    short = _confirm(base_url, token, "short")
    assert short.json()["error"]["details"][0]["field"] == "password"
    # Nothing changed: the session and the old password still work.
    assert church.session.get("/v1/me").status_code == 200


def test_a_new_password_voids_other_reset_links(
    church: Church, stack: Stack, base_url: str
) -> None:
    for count in (1, 2):
        assert _reset(base_url, church.email).status_code == 202
        outbox_mail(stack, church.email, "password_reset", count=count)
    rows = sql(
        stack,
        "SELECT m.body FROM mail_outbox m WHERE m.recipient = %s AND m.kind = 'password_reset' "
        "ORDER BY m.created_at",
        (church.email,),
    )
    first, second = (token_in(r[0], "reset-password", base_url) for r in rows)
    assert _confirm(base_url, second).status_code == 200
    assert error_of(_confirm(base_url, first, "a third passphrase")) == (422, "validation_error")


def test_reset_requests_are_limited_per_account(church: Church, base_url: str) -> None:
    for email in (church.email, new_email("ghost")):
        for _ in range(3):
            assert _reset(base_url, email).status_code == 202
        limited = _reset(base_url, email.upper())
        assert error_of(limited) == (429, "rate_limited")
        assert int(limited.headers["Retry-After"]) >= 1


def test_login_is_limited_per_account(church: Church, base_url: str) -> None:
    def wrong_login(_: int) -> Any:
        with browser(base_url) as client:
            return client.post(
                "/v1/auth/login", json={"email": church.email, "password": "wrong password!"}
            )

    # All at once: the limit is charged before the (slow) password check, so the
    # verdicts do not depend on how fast argon2 runs on this machine.
    with ThreadPoolExecutor(11) as pool:
        answers = list(pool.map(wrong_login, range(11)))
    assert sorted(a.status_code for a in answers) == [401] * 10 + [429]
    limited = next(a for a in answers if a.status_code == 429)
    assert error_of(limited) == (429, "rate_limited")
    assert int(limited.headers["Retry-After"]) >= 1
    # Even the right password waits now: the limit comes before the check.
    right = browser(base_url).post(
        "/v1/auth/login", json={"email": church.email, "password": PASSWORD}
    )
    assert error_of(right) == (429, "rate_limited")


# -- passwords, sessions and cookies -----------------------------------------------------


def test_passwords_are_argon2id(church: Church, stack: Stack, base_url: str) -> None:
    assert _password_hash(stack, church.user_id).startswith("$argon2id$")
    _, user = join(church, stack, base_url, "staff")
    assert _password_hash(stack, user["id"]).startswith("$argon2id$")


def test_session_cookie_flags(base_url: str) -> None:
    with browser(base_url) as client:
        answer = client.post(
            "/v1/auth/signup",
            json={"church_name": "Hope", "email": new_email("owner"), "password": PASSWORD},
        )
        assert answer.status_code == 201
        cookies = {c.split("=", 1)[0]: c.lower() for c in answer.headers.get_list("set-cookie")}
    session, csrf = cookies["koinonia_session"], cookies["koinonia_csrf"]
    assert "httponly" in session
    assert "httponly" not in csrf
    for cookie in (session, csrf):
        assert "samesite=lax" in cookie
        assert "path=/" in cookie
        # The test stack is plain HTTP: no Secure flag unless KOINONIA_SECURE_COOKIES.
        assert "secure" not in cookie


def test_secure_cookies_when_served_over_tls() -> None:
    for secure in (True, False):
        response = Response()
        set_session_cookies(response, HttpSettings(secure_cookies=secure), "tok", "csrf")
        cookies = [c.lower() for c in response.headers.getlist("set-cookie")]
        assert len(cookies) == 2
        for cookie in cookies:
            assert ("; secure" in cookie) is secure
            assert "samesite=lax" in cookie


def test_change_own_password(church: Church, stack: Stack, base_url: str) -> None:
    other = login(base_url, church.email)
    wrong = church.session.post(
        "/v1/me/password", json={"current_password": "not my password", "new_password": "x" * 12}
    )
    assert error_of(wrong) == (422, "validation_error")
    assert wrong.json()["error"]["details"] == [
        {"field": "current_password", "message": "is not your current password"}
    ]
    short = church.session.post(
        "/v1/me/password", json={"current_password": PASSWORD, "new_password": "short"}
    )
    assert short.json()["error"]["details"][0]["field"] == "new_password"

    changed = church.session.post(
        "/v1/me/password", json={"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["data"] == {"password_changed": True, "sessions_ended": 1}
    assert church.session.get("/v1/me").status_code == 200
    assert error_of(other.get("/v1/me")) == (401, "unauthorized")
    login(base_url, church.email, NEW_PASSWORD).close()
    assert _password_hash(stack, church.user_id).startswith("$argon2id$")
    other.close()


def test_name_and_last_login(church: Church, base_url: str) -> None:
    before = church.session.get(f"/v1/staff/{church.user_id}").json()["data"]
    assert before["name"] == ""
    assert before["last_login_at"] is None
    named = church.session.patch("/v1/me", json={"name": "  Pastor Ann "})
    assert named.status_code == 200, named.text
    assert named.json()["data"]["name"] == "Pastor Ann"
    assert church.session.patch("/v1/me", json={}).json()["data"]["name"] == "Pastor Ann"
    login(base_url, church.email).close()
    after = church.session.get(f"/v1/staff/{church.user_id}").json()["data"]
    assert after["name"] == "Pastor Ann"
    assert after["last_login_at"] is not None


def test_logout_ends_only_that_session(church: Church, base_url: str) -> None:
    other = login(base_url, church.email)
    assert other.post("/v1/auth/logout").status_code == 200
    assert error_of(other.get("/v1/me")) == (401, "unauthorized")
    assert church.session.get("/v1/me").status_code == 200
    other.close()


# -- the mailer ---------------------------------------------------------------------------


class _Inbox:
    """An aiosmtpd handler that keeps what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], Message]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.original_content or envelope.content)
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 OK"


def _authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"mailer", b"s3cret")
    # handled=False: aiosmtpd answers the refusal itself (535).
    return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: (server context, client context)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder: Path = tmp_path_factory.mktemp("smtp-tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


@pytest.fixture
def smtp_inbox() -> _Inbox:
    return _Inbox()


def _serve(inbox: _Inbox, **options: Any) -> Controller:
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=_authenticator,
        **options,
    )
    controller.start()
    return controller


@pytest.fixture
async def pool(stack: Stack) -> AsyncIterator[Pool]:
    opened = await open_pool(
        DatabaseSettings(url=stack.env["DATABASE_URL"], pool_min=1, pool_max=2)
    )
    yield opened
    await opened.close()


def _mail(to: str) -> Mail:
    return Mail(
        to=to,
        subject="Reset your\nKoinonia password",
        body="Choose a new password here:\nhttp://example.org/reset-password?token=abc\n\nabc\n",
        kind="password_reset",
    )


def _stored(stack: Stack, entry_id: uuid.UUID) -> tuple[Any, ...]:
    return sql(stack, "SELECT status, body, error FROM mail_outbox WHERE id = %s", (entry_id,))[0]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["plain", "starttls", "smtps"])
async def test_mailer_sends_through_smtp(
    mode: str,
    church: Church,
    stack: Stack,
    pool: Pool,
    smtp_inbox: _Inbox,
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_tls, client_tls = tls
    options: dict[str, Any] = {
        "plain": {"auth_require_tls": False},
        "starttls": {"tls_context": server_tls, "require_starttls": True},
        # aiosmtpd counts only STARTTLS as TLS for AUTH; smtps is TLS from the start.
        "smtps": {"ssl_context": server_tls, "auth_require_tls": False},
    }[mode]
    controller = _serve(smtp_inbox, **options)
    scheme = "smtps" if mode == "smtps" else "smtp"
    url = f"{scheme}://mailer:s3cret@127.0.0.1:{controller.port}"
    try:
        mailer = Mailer(
            MailSettings(smtp_url=url, sender="Koinonia <no-reply@grace.example>"),
            pool,
            ssl_context=client_tls,
        )
        to = new_email("smtp")
        entry = await mailer.send(uuid.UUID(church.id), _mail(to))
    finally:
        controller.stop()
    assert entry.status == "sent", entry.error
    assert len(smtp_inbox.received) == 1
    mail_from, rcpt_tos, message = smtp_inbox.received[0]
    assert mail_from == "no-reply@grace.example"
    assert rcpt_tos == [to]
    assert message["To"] == to
    assert message["Subject"] == "Reset your Koinonia password"
    assert message["Message-ID"].endswith("@grace.example>")
    assert "reset-password?token=abc" in message.get_payload(decode=True).decode()
    # Recorded, without the body (it may hold a live token).
    assert _stored(stack, entry.id) == ("sent", None, None)


@pytest.mark.anyio
async def test_mailer_records_smtp_failures(
    church: Church, stack: Stack, pool: Pool, smtp_inbox: _Inbox
) -> None:
    controller = _serve(smtp_inbox, auth_require_tls=False)
    try:
        wrong = Mailer(
            MailSettings(smtp_url=f"smtp://mailer:wrong@127.0.0.1:{controller.port}"), pool
        )
        refused = await wrong.send(uuid.UUID(church.id), _mail(new_email()))
    finally:
        controller.stop()
    assert refused.status == "failed"
    assert refused.error is not None
    assert "Authentication" in refused.error
    assert smtp_inbox.received == []

    nobody = Mailer(MailSettings(smtp_url=f"smtp://127.0.0.1:{free_port()}"), pool, timeout_s=2)
    down = await nobody.send(uuid.UUID(church.id), _mail(new_email()))
    assert down.status == "failed"
    assert _stored(stack, down.id)[:2] == ("failed", None)


@pytest.mark.anyio
async def test_mailer_without_smtp_stores_in_the_outbox(
    church: Church, stack: Stack, pool: Pool
) -> None:
    to = new_email()
    entry = await Mailer(MailSettings(), pool).send(uuid.UUID(church.id), _mail(to))
    assert entry.status == "stored"
    assert entry.body == _mail(to).body
    assert _stored(stack, entry.id) == ("stored", _mail(to).body, None)


def test_smtp_urls() -> None:
    plain = parse_smtp_url("smtp://user%40x:p%3Ass@mail.example.org")
    assert (plain.host, plain.port, plain.implicit_tls) == ("mail.example.org", 25, False)
    assert (plain.username, plain.password) == ("user@x", "p:ss")
    tls = parse_smtp_url("smtps://mail.example.org")
    assert (tls.port, tls.implicit_tls, tls.username) == (465, True, None)
    assert parse_smtp_url("smtp://h:2525").port == 2525
    for bad in ("http://mail.example.org", "smtp://", "smtp://h:port"):
        with pytest.raises(ValueError, match="KOINONIA_SMTP_URL"):
            parse_smtp_url(bad)


def test_outbox_command_lists_the_mail(church: Church, stack: Stack, base_url: str) -> None:
    assert _reset(base_url, church.email).status_code == 202
    _, body, _, _ = outbox_mail(stack, church.email, "password_reset")
    token = token_in(body, "reset-password", base_url)
    by_url = dict(stack.env)
    # Without DATABASE_URL it finds the embedded Postgres of the data folder.
    by_data_dir = {**stack.env, "DATABASE_URL": "", "KOINONIA_DATA_DIR": str(stack.data_dir)}
    for env in (by_url, by_data_dir):
        shown = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "outbox", "--to", church.email, "--limit", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert f"To: {church.email}" in shown
        assert "Subject: Reset your Koinonia password" in shown
        assert f"{base_url}/reset-password?token={token}" in shown
    nobody = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "outbox", "--to", new_email("nobody")],
        env=by_url,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert nobody.strip() == "outbox: no mail"
