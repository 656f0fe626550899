"""Mail to staff (invitations, password resets): through SMTP, or the development outbox.

With ``KOINONIA_SMTP_URL`` set, a mail leaves through that server:

- ``smtp://user:pass@host:port`` (port 25 by default) upgrades with STARTTLS
  whenever the server offers it, and logs in when the URL names a user;
- ``smtps://user:pass@host:port`` (port 465 by default) speaks TLS from the start.

``smtplib`` blocks, so each send runs in a worker thread with a 10 s timeout.
Without a server, the mail is stored in Postgres (``mail_outbox``, status
``stored``) and ``koinonia outbox`` lists it: development needs no mail server.

Either way every mail leaves a row in ``mail_outbox``. Rows of mail that went
through SMTP (``sent``, or ``failed`` with the error) keep the envelope only,
never the body, which may carry a live reset or invitation token.

``Mailer.send`` never raises for a delivery problem: it returns the row, whose
``status`` tells what happened (callers of public endpoints must not answer
differently, and an invitation stays valid when its mail could not be sent).
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import uuid
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from urllib.parse import unquote, urlsplit

import anyio.to_thread
import msgspec

from storage.pg.database import Pool
from storage.pg.mail_outbox import OutboxEntry, record_mail
from storage.process.settings import MailSettings

log = logging.getLogger("koinonia.mail")

SMTP_TIMEOUT_S = 10.0


class Mail(msgspec.Struct, frozen=True):
    to: str
    subject: str
    body: str
    kind: str = ""
    """What the mail is for (``invitation``, ``password_reset``): for the outbox listing."""


class SmtpServer(msgspec.Struct, frozen=True):
    host: str
    port: int
    implicit_tls: bool
    username: str | None = None
    password: str | None = None


def parse_smtp_url(url: str) -> SmtpServer:
    """``smtp[s]://[user[:pass]@]host[:port]``; user and password may be %-encoded."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError("KOINONIA_SMTP_URL must look like smtp://user:pass@host:port or smtps://")
    implicit_tls = parts.scheme == "smtps"
    try:
        port = parts.port or (465 if implicit_tls else 25)
    except ValueError as exc:
        raise ValueError("KOINONIA_SMTP_URL has an invalid port") from exc
    return SmtpServer(
        host=parts.hostname,
        port=port,
        implicit_tls=implicit_tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class Mailer:
    """Sends mail for one process; cheap to build (it only parses the URL)."""

    def __init__(
        self,
        settings: MailSettings,
        pool: Pool,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = SMTP_TIMEOUT_S,
    ) -> None:
        self.sender = settings.sender
        self.server = parse_smtp_url(settings.smtp_url) if settings.smtp_url else None
        self.pool = pool
        # Tests pass a context that trusts their own certificate; production uses
        # the system's trust store with hostname checks.
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s

    async def send(self, church_id: uuid.UUID, mail: Mail) -> OutboxEntry:
        if self.server is None:
            return await self._record(church_id, mail, "stored", body=mail.body)
        message = self.message(mail)
        try:
            await anyio.to_thread.run_sync(self._deliver, self.server, message)
        except (OSError, smtplib.SMTPException) as exc:
            # The error names the server's answer, never the body.
            error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("mail not sent", extra={"kind": mail.kind, "error": error})
            return await self._record(church_id, mail, "failed", error=error)
        return await self._record(church_id, mail, "sent")

    def message(self, mail: Mail) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = mail.to
        # A church name with a line break must not become a header of its own.
        message["Subject"] = " ".join(mail.subject.split())
        message["Date"] = formatdate(localtime=False, usegmt=True)
        domain = parseaddr(self.sender)[1].rpartition("@")[2] or "koinonia.local"
        message["Message-ID"] = make_msgid(domain=domain)
        message.set_content(mail.body)
        return message

    def _deliver(self, server: SmtpServer, message: EmailMessage) -> None:
        context = self.ssl_context or ssl.create_default_context()
        client: smtplib.SMTP
        if server.implicit_tls:
            client = smtplib.SMTP_SSL(
                server.host, server.port, timeout=self.timeout_s, context=context
            )
        else:
            client = smtplib.SMTP(server.host, server.port, timeout=self.timeout_s)
        with client:
            client.ehlo()
            if not server.implicit_tls and client.has_extn("starttls"):
                client.starttls(context=context)
                client.ehlo()
            if server.username is not None:
                client.login(server.username, server.password or "")
            client.send_message(message)

    async def _record(
        self,
        church_id: uuid.UUID,
        mail: Mail,
        status: str,
        *,
        body: str | None = None,
        error: str | None = None,
    ) -> OutboxEntry:
        async with self.pool.connection() as conn:
            return await record_mail(
                conn,
                church_id,
                recipient=mail.to,
                subject=mail.subject,
                body=body,
                kind=mail.kind,
                status=status,
                error=error,
            )
