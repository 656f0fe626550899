"""Keywords that join groups: a church's words that add whoever texts them to a group.

A keyword is one word of letters and digits, unique in its church whatever its case
(``match_key``: the word upper-cased, as storage/pg/keywords.py ``normalize`` makes an
inbound text), never one of the SMS keywords (STOP, START, HELP and their synonyms:
those belong to the carriers' rules and are matched first).

An inbound text matches when, normalized as the SMS keywords are (trimmed, inner
whitespace collapsed, upper case), it is the word or ``JOIN <word>``. Inside the
transaction that records the text (``apply_group_keyword``):

- the sender joins the group (``member.joined_group``, source ``keyword``); already
  a member of it, nothing changes and they get the ``repeat_reply``;
- their text is consent: opted in with source ``keyword`` (``member.opted_in`` and a
  ``system`` audit row) unless they already were by a consent of their own or of
  staff. Someone who only ever texted in (source ``inbound``, never asked) is
  recorded as opted in by the keyword;
- except someone who texted STOP: carriers make that binding until they text START,
  so they are added to the group (the church asked for it and a broadcast skips
  them anyway) but stay opted out and get no answer.

The caller accepts the answer as a one-recipient message in the same transaction
(storage/pg/conversations.py ``accept_reply``, not consent exempt: consent is checked
again when it is sent) and enqueues it after the commit.
"""

from __future__ import annotations

import unicodedata
import uuid
from datetime import datetime
from typing import Final

import msgspec
from psycopg import errors

from storage.domain.errors import Conflict, InvalidInput, NotFound
from storage.domain.events import (
    MemberJoinedGroup,
    MemberJoinedGroupEvent,
    MemberOptChanged,
    MemberOptedInEvent,
)
from storage.domain.ids import uuid7
from storage.pg.audit import record
from storage.pg.churches import get_settings
from storage.pg.database import Conn
from storage.pg.event_log import append
from storage.pg.freshness import stale_ok
from storage.pg.keywords import HELP_WORDS, OPT_IN_WORDS, OPT_OUT_WORDS, normalize
from storage.pg.pagination import Page, id_page

MAX_KEYWORD_LENGTH: Final = 32
RESERVED: Final = OPT_OUT_WORDS | OPT_IN_WORDS | HELP_WORDS
JOIN_PREFIX: Final = "JOIN "
SOURCE: Final = "keyword"


class GroupKeyword(msgspec.Struct, frozen=True):
    id: uuid.UUID
    keyword: str
    """As the church wrote it; matched whatever the case."""
    group_id: uuid.UUID
    reply: str
    """The answer to the first text of the keyword."""
    repeat_reply: str | None
    """The answer to a sender already in the group; null: a built-in text."""
    created_at: datetime


_COLS = "id, keyword, group_id, reply, repeat_reply, created_at"
_TAKEN = "this church already has this keyword (keywords match whatever their case)"


def match_key(word: str) -> str:
    """The form a keyword is stored and looked up by. NFC first, so an accented letter
    typed precomposed or with a combining mark is the same keyword."""
    return normalize(unicodedata.normalize("NFC", word))


def keyword_problem(keyword: str) -> str | None:
    """Why ``keyword`` cannot be a group keyword (None: it can)."""
    cleaned = unicodedata.normalize("NFC", keyword)
    if not cleaned or not cleaned.isalnum():
        return "must be one word of letters and digits"
    if len(cleaned) > MAX_KEYWORD_LENGTH:
        return f"must be at most {MAX_KEYWORD_LENGTH} characters"
    if match_key(cleaned) in RESERVED:
        return "is an opt-out, opt-in or help word (STOP, START, HELP, ...), which carriers reserve"
    return None


def _text(field: str, value: str) -> str:
    if not value.strip():
        raise InvalidInput(field, "must not be blank")
    return value


async def create_keyword(
    conn: Conn,
    church_id: uuid.UUID,
    *,
    keyword: str,
    group_id: uuid.UUID,
    reply: str,
    repeat_reply: str | None,
) -> GroupKeyword:
    """Save a keyword: ``InvalidInput`` for a malformed or reserved word or a blank
    answer, ``NotFound`` for a group that is not the church's, ``Conflict`` for a word
    the church already has. Nothing is written on any of them."""
    problem = keyword_problem(keyword)
    if problem is not None:
        raise InvalidInput("keyword", problem)
    _text("reply", reply)
    if repeat_reply is not None:
        _text("repeat_reply", repeat_reply)
    word = unicodedata.normalize("NFC", keyword)
    try:
        cur = await conn.execute(
            "INSERT INTO group_keyword (church_id, id, keyword, match_key, group_id, reply, "
            f"repeat_reply) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_COLS}",
            (church_id, uuid7(), word, match_key(word), group_id, reply, repeat_reply),
        )
    except errors.UniqueViolation as exc:
        raise Conflict(_TAKEN, field="keyword") from exc
    except errors.ForeignKeyViolation as exc:
        raise NotFound("group") from exc
    row = await cur.fetchone()
    assert row is not None
    return GroupKeyword(*row)


@stale_ok
async def list_keywords(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[GroupKeyword]:
    return await id_page(
        conn,
        f"SELECT {_COLS} FROM group_keyword",
        church_id,
        limit=limit,
        cursor=cursor,
        row=GroupKeyword,
    )


async def delete_keyword(conn: Conn, church_id: uuid.UUID, keyword_id: uuid.UUID) -> GroupKeyword:
    """Delete a keyword (``NotFound`` for one that is not the church's); the members
    it added stay in the group."""
    cur = await conn.execute(
        f"DELETE FROM group_keyword WHERE church_id = %s AND id = %s RETURNING {_COLS}",
        (church_id, keyword_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("keyword")
    return GroupKeyword(*row)


# Inbound texts ------------------------------------------------------------------------


def candidate(text: str) -> str | None:
    """The keyword an inbound text names, as a match key: the whole text, or what
    follows ``JOIN``; None when that is not one word."""
    word = match_key(text)
    if word.startswith(JOIN_PREFIX):
        word = word[len(JOIN_PREFIX) :]
    if not word or " " in word:
        return None
    return word


def default_repeat(church_name: str) -> str:
    return f"{church_name}: you're already on the list. Reply HELP for help, STOP to opt out."


class JoinOutcome(msgspec.Struct, frozen=True):
    """What a group keyword did: ``joined`` when the sender was added to the group,
    ``opted_in`` when their consent moved to ``keyword``; ``reply`` the answer to send
    (None: they texted STOP, nothing of ours may reach them)."""

    keyword_id: uuid.UUID
    keyword: str
    group_id: uuid.UUID
    joined: bool
    opted_in: bool
    reply: str | None


async def apply_group_keyword(
    conn: Conn, church_id: uuid.UUID, member_id: uuid.UUID, text: str
) -> JoinOutcome | None:
    """Act on an inbound text if it names one of the church's group keywords (None
    otherwise), in the caller's transaction: membership, consent, their events and the
    audit row; returns the answer to send."""
    key = candidate(text)
    if key is None:
        return None
    cur = await conn.execute(
        "SELECT id, keyword, group_id, reply, repeat_reply FROM group_keyword "
        "WHERE church_id = %s AND match_key = %s",
        (church_id, key),
    )
    found = await cur.fetchone()
    if found is None:
        return None
    keyword_id, word, group_id, reply, repeat_reply = found
    # Locked, so two texts of one sender that race see one consent state and one of
    # them joins.
    cur = await conn.execute(
        "SELECT opted_in, opt_source FROM member "
        "WHERE church_id = %s AND id = %s AND deleted_at IS NULL FOR UPDATE",
        (church_id, member_id),
    )
    state = await cur.fetchone()
    if state is None:
        return None
    opted_in, opt_source = state
    stopped = not opted_in and opt_source == SOURCE
    cur = await conn.execute(
        "INSERT INTO group_membership (church_id, group_id, member_id) VALUES (%s, %s, %s) "
        "ON CONFLICT DO NOTHING",
        (church_id, group_id, member_id),
    )
    joined = cur.rowcount == 1
    if joined:
        event = MemberJoinedGroupEvent.new(MemberJoinedGroup(member_id, group_id, SOURCE))
        await append(conn, [(church_id, (), event)])
    changed = False
    if not stopped and (not opted_in or opt_source == "inbound"):
        changed = await _opt_in(conn, church_id, member_id, word)
    answer: str | None = None
    if not stopped:
        if joined:
            answer = reply
        else:
            answer = repeat_reply or default_repeat((await get_settings(conn, church_id)).name)
    return JoinOutcome(keyword_id, word, group_id, joined=joined, opted_in=changed, reply=answer)


async def _opt_in(conn: Conn, church_id: uuid.UUID, member_id: uuid.UUID, word: str) -> bool:
    """Record the keyword as the member's consent. ``clock_timestamp()``, not ``now()``:
    a member created by this very text got its first consent row at the transaction's
    start, and the history trigger records a state whose time moved."""
    cur = await conn.execute(
        "UPDATE member SET opted_in = true, opt_source = %s, opt_changed_at = clock_timestamp() "
        "WHERE church_id = %s AND id = %s AND deleted_at IS NULL",
        (SOURCE, church_id, member_id),
    )
    if cur.rowcount != 1:
        return False
    event = MemberOptedInEvent.new(MemberOptChanged(member_id, SOURCE))
    await append(conn, [(church_id, (), event)])
    await record(
        conn,
        church_id,
        actor_type="system",
        actor_id=None,
        action="member.opt_in",
        target_type="members",
        target_id=str(member_id),
        details={"source": SOURCE, "keyword": word, "confirmation": "sent"},
    )
    return True
