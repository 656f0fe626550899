"""SMS keywords: STOP and its synonyms, START / UNSTOP / YES, HELP / INFO.

A keyword is a whole message, compared case-insensitively once surrounding
whitespace and punctuation are trimmed and inner runs of whitespace made one
space: ``" Stop! "`` and ``"stop   all"`` are keywords, ``"please stop by"`` is not.

What each does, inside the transaction that records the inbound text:

- **opt-out** (STOP, STOPALL, STOP ALL, UNSUBSCRIBE, CANCEL, END, QUIT, REVOKE,
  OPTOUT): the member is opted out with source ``keyword``; ``member.opted_out``
  is recorded for webhooks and a ``system`` row for the audit log. No text of
  ours answers it: Telnyx (and the carriers before it) answer STOP themselves and
  from that moment refuse every send to the number with error 40300, so a
  confirmation of ours could only fail. The audit row records
  ``"confirmation": "provider"``.
- **opt-in** (START, UNSTOP, YES): opted in again with source ``keyword`` (the
  only way back for someone who texted STOP; staff and the API get a conflict),
  ``member.opted_in``, an audit row, and a confirmation (the church's
  ``opt_in_text`` or the built-in text). The provider lifts its block on START,
  so our confirmation goes out. A YES from someone already opted in is an
  ordinary answer ("Yes, I'll come"): no reply.
- **help** (HELP, INFO): the church's ``help_text``, or a built-in text naming
  the church and how to opt out; not to someone who texted STOP (the provider
  would refuse it, and answers their HELP itself).

The caller accepts the reply as a one-recipient message in the same transaction
(storage/pg/conversations.py ``accept_reply``) and enqueues it after the commit, on
the pipeline every text takes. HELP answers and START confirmations are the two
kinds sent whatever the opt-in state (``consent_exempt``), as carriers allow.

A church's own keywords that join groups (storage/pg/group_keywords.py) may never be
one of these words, and are looked for only in a text that is none of them.
"""

from __future__ import annotations

import enum
import unicodedata
import uuid
from typing import Final

import msgspec

from storage.domain.events import MemberOptChanged, MemberOptedInEvent, MemberOptedOutEvent
from storage.pg.audit import record
from storage.pg.churches import ChurchSettings, get_settings
from storage.pg.database import Conn
from storage.pg.event_log import append

OPT_OUT_WORDS: Final = frozenset(
    {"STOP", "STOPALL", "STOP ALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)
OPT_IN_WORDS: Final = frozenset({"START", "UNSTOP", "YES"})
HELP_WORDS: Final = frozenset({"HELP", "INFO"})

MAX_REPLY_LENGTH = 480
"""Longest configurable answer (three GSM-7 segments)."""


class Kind(enum.StrEnum):
    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"
    HELP = "help"


def normalize(text: str) -> str:
    """Upper case, inner whitespace collapsed, surrounding whitespace and punctuation gone."""
    words = " ".join(text.split())
    start, end = 0, len(words)
    while start < end and _trimmed(words[start]):
        start += 1
    while end > start and _trimmed(words[end - 1]):
        end -= 1
    return " ".join(words[start:end].split()).upper()


def _trimmed(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def match(text: str) -> tuple[Kind, str] | None:
    """(kind, the keyword as normalized) when the whole message is a keyword."""
    word = normalize(text)
    if word in OPT_OUT_WORDS:
        return Kind.OPT_OUT, word
    if word in OPT_IN_WORDS:
        return Kind.OPT_IN, word
    if word in HELP_WORDS:
        return Kind.HELP, word
    return None


def default_help(church_name: str) -> str:
    return (
        f"{church_name}: texts from your church. Reply STOP to opt out, START to opt "
        "back in. Msg & data rates may apply."
    )


def default_opt_in(church_name: str) -> str:
    return (
        f"{church_name}: you're subscribed again and will receive our texts. "
        "Reply HELP for help, STOP to opt out."
    )


def help_reply(church: ChurchSettings) -> str:
    return church.help_text or default_help(church.name)


def opt_in_reply(church: ChurchSettings) -> str:
    return church.opt_in_text or default_opt_in(church.name)


class Outcome(msgspec.Struct, frozen=True):
    """What a keyword did: ``changed`` when the opt state moved; ``reply`` the text to
    send back (None: nothing of ours answers it)."""

    kind: Kind
    keyword: str
    changed: bool
    reply: str | None


async def apply_keyword(
    conn: Conn, church_id: uuid.UUID, member_id: uuid.UUID, text: str
) -> Outcome | None:
    """Act on an inbound text if it is a keyword (None otherwise), in the caller's
    transaction: opt state, webhook event, audit row; returns the reply to send."""
    found = match(text)
    if found is None:
        return None
    kind, word = found
    if kind is Kind.HELP:
        if await _blocked(conn, church_id, member_id):
            return Outcome(kind, word, changed=False, reply=None)
        church = await get_settings(conn, church_id)
        return Outcome(kind, word, changed=False, reply=help_reply(church))
    opted_in = kind is Kind.OPT_IN
    changed = await _set_opt(conn, church_id, member_id, opted_in)
    reply: str | None = None
    if opted_in and (changed or word != "YES"):
        reply = opt_in_reply(await get_settings(conn, church_id))
    if changed:
        await record(
            conn,
            church_id,
            actor_type="system",
            actor_id=None,
            action="member.opt_in" if opted_in else "member.opt_out",
            target_type="members",
            target_id=str(member_id),
            details={
                "source": "keyword",
                "keyword": word,
                "confirmation": "sent" if reply is not None else "provider",
            },
        )
    return Outcome(kind, word, changed=changed, reply=reply)


async def _blocked(conn: Conn, church_id: uuid.UUID, member_id: uuid.UUID) -> bool:
    """Whether the member opted out by keyword: the provider refuses every send to
    them until they text START (and answers their HELP itself)."""
    cur = await conn.execute(
        "SELECT NOT opted_in AND opt_source = 'keyword' FROM member "
        "WHERE church_id = %s AND id = %s",
        (church_id, member_id),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _set_opt(conn: Conn, church_id: uuid.UUID, member_id: uuid.UUID, opted_in: bool) -> bool:
    """Move the member's consent with source ``keyword``; False when it was already so
    (then nothing is recorded: the source and time stay those of the consent that
    set it). The consent history row comes from the member table's trigger."""
    cur = await conn.execute(
        "UPDATE member SET opted_in = %s, opt_source = 'keyword', opt_changed_at = now() "
        "WHERE church_id = %s AND id = %s AND deleted_at IS NULL AND opted_in <> %s",
        (opted_in, church_id, member_id, opted_in),
    )
    if cur.rowcount != 1:
        return False
    data = MemberOptChanged(member_id, "keyword")
    event = MemberOptedInEvent.new(data) if opted_in else MemberOptedOutEvent.new(data)
    await append(conn, [(church_id, (), event)])
    return True
