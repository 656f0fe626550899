"""Conversation search: ``GET /v1/conversations?q=``.

A conversation matches when its member's name, or one of its live messages (the
archived months have left the database), holds every word of ``q``; or when ``q``
is its member's full phone number, found by the keyed hash (never by decrypting).

Words are what Postgres's ``simple`` text-search configuration makes of ``q``: the
same parser that made the stored documents (migration 0015), so punctuation, e-mail
addresses or apostrophes split the same way on both sides, and nothing a user types
is query syntax. Words match whole words, except the last one typed, which matches
the words it begins ("Marisol Quin" finds Marisol Quintero): staff search as they
type. Only the last: a prefix makes the index gather every word it begins, which
for a short or common one costs several times an exact word; and a word with a digit
matches whole, so part of a number never finds a text quoting the whole one.

Message bodies are searched one of two ways, chosen per query from the planner's
estimates (``_walks``). A rare word: read every matching message from the full-text
index and keep the conversations holding them. A common word: walk the conversations
most recent first, checking each one's newest messages until one matches; most
conversations have one, so a page fills after a few hundred messages, where reading
every match would read most of the table. What is left slowest (bench/search.py):
words of middling frequency, a few thousand matches, where either way reads
thousands of rows; and, were the walk chosen for it, a word said thousands of times
in a few conversations only (the walk would read them all).
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Literal

from storage.domain.errors import InvalidPhone
from storage.domain.phones import PhoneVault, normalize
from storage.pg.conversations import Conversation, ConversationFilter
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.pagination import Page, decode_cursor, page_of

_PHONE_LIKE = re.compile(r"^\+?[\d\s().-]{7,40}$")
"""What could be a whole phone number: digits and the usual separators (letters would
let ``phonenumbers`` read ``1-800-FLOWERS`` as a number)."""

_CONV = (
    "c.id, c.member_id, c.status, c.unread_count, c.assignee_id, c.last_message_at, c.created_at"
)
# Statements that test the words run unprepared (``prepare=False``): the pool prepares
# on first use, and a prepared statement's generic plan, made without the words, would
# read a rare word as if it were common (or the reverse).
_BODY_MATCHES = "cm.body_search @@ %s::tsquery"
_NAME_MATCHES = "m.name_search @@ %s::tsquery"


MATCH_COST = 4
"""What reading one match costs, in messages walked (see ``_walks``)."""

PREFIX_MIN = 3
"""The shortest last word matched as a prefix: shorter ones match too many words."""


def prefix_query(lexemes: list[str]) -> str | None:
    """A ``tsquery`` (text form) needing every lexeme (in the order typed), the last
    one as a prefix when it is long enough and holds no digit; None when there are
    none. Lexemes are quoted as tsquery input wants (quotes and backslashes doubled),
    so any text is safe."""
    terms = []
    for lexeme in lexemes:
        terms.append("'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'")
    if terms:
        last = lexemes[-1]
        if len(last) >= PREFIX_MIN and not any(ch.isdigit() for ch in last):
            terms[-1] += ":*"
    return " & ".join(terms) or None


def without_compounds(lexemes: list[str]) -> list[str]:
    """Leave out a hyphenated word whose parts are words too: the parser gives "pick-me"
    as "pick-me", "pick" and "me", and "pick me up" holds no "pick-me"."""
    present = set(lexemes)
    return [
        lexeme
        for lexeme in lexemes
        if "-" not in lexeme or not all(part in present for part in lexeme.split("-"))
    ]


def phone_hash(vault: PhoneVault, q: str, country: str) -> bytes | None:
    """The lookup hash of ``q`` when it is a whole valid number (E.164, or national
    with the church's country, as member creation reads it)."""
    text = q.strip()
    if not _PHONE_LIKE.match(text):
        return None
    try:
        return vault.lookup_hash(normalize(text, country))
    except InvalidPhone:
        return None


def _filters(where: ConversationFilter | None, clauses: list[str], params: list[Any]) -> None:
    if where is None:
        return
    if where.status is not None:
        clauses.append("c.status = %s")
        params.append(where.status)
    if where.unread is not None:
        clauses.append("c.unread_count > 0" if where.unread else "c.unread_count = 0")
    if where.assignee_id is not None:
        clauses.append("c.assignee_id = %s")
        params.append(where.assignee_id)


Strategy = Literal["auto", "set", "walk"]


async def _estimated_rows(conn: Conn, query: str, params: tuple[Any, ...]) -> float:
    """The planner's row estimate for ``query`` (planned, not run)."""
    cur = await conn.execute(f"EXPLAIN (FORMAT JSON) {query}", params, prepare=False)
    row = await cur.fetchone()
    assert row is not None
    return float(row[0][0]["Plan"]["Plan Rows"])


async def _walks(conn: Conn, church_id: uuid.UUID, words: str, limit: int) -> bool:
    """Whether walking the conversations is cheaper than reading every match.

    Reading every match costs M index entries and heap rows; the walk reads messages
    newest first until ``limit + 1`` conversations matched: about (limit + 1) / d of
    them at density d = M / N. A match read costs several messages walked (bench:
    about 6; ``MATCH_COST`` errs toward reading, whose cost is bounded by M, while
    a word said often in few conversations makes the walk read them all). M and N
    are the planner's estimates (the full-text statistics of the stored documents):
    two plans, no rows read.
    """
    matches = await _estimated_rows(
        conn,
        f"SELECT 1 FROM conversation_message cm WHERE cm.church_id = %s AND {_BODY_MATCHES}",
        (church_id, words),
    )
    total = await _estimated_rows(
        conn, "SELECT 1 FROM conversation_message cm WHERE cm.church_id = %s", (church_id,)
    )
    return MATCH_COST * matches * matches > (limit + 1) * total


@stale_ok
async def search_conversations(
    conn: Conn,
    church_id: uuid.UUID,
    vault: PhoneVault,
    *,
    q: str,
    limit: int,
    cursor: str | None,
    where: ConversationFilter | None = None,
    strategy: Strategy = "auto",
) -> Page[Conversation]:
    """The church's conversations matching ``q`` (and ``where``), most recent
    activity first, keyset-paged with the list's cursor. ``strategy``: how bodies are
    searched (module docstring); ``auto`` decides, the tests force each one to check
    that both answer alike."""
    after = decode_cursor(cursor) if cursor else None
    cur = await conn.execute(
        "SELECT country, ARRAY(SELECT lexeme FROM unnest(to_tsvector('simple', %s)) "
        "ORDER BY positions[1]) "
        "FROM church WHERE id = %s",
        (q, church_id),
    )
    row = await cur.fetchone()
    if row is None:
        return Page(items=[], next_cursor=None)
    country, lexemes = row
    words = prefix_query(without_compounds(list(lexemes)))
    hashed = phone_hash(vault, q, country)
    if words is None and hashed is None:
        return Page(items=[], next_cursor=None)

    # Name and phone: a set of members computed once (a hashed subplan).
    member_tests = []
    member_params: list[Any] = []
    if words is not None:
        member_tests.append(_NAME_MATCHES)
        member_params.append(words)
    if hashed is not None:
        member_tests.append("m.phone_hash = %s")
        member_params.append(hashed)
    matches = [
        "c.member_id IN (SELECT m.id FROM member m WHERE m.church_id = %s "
        f"AND m.deleted_at IS NULL AND ({' OR '.join(member_tests)}))"
    ]
    match_params: list[Any] = [church_id, *member_params]
    join, join_params = "", []
    if words is not None:
        walk = strategy == "walk" or (
            strategy == "auto" and await _walks(conn, church_id, words, limit)
        )
        if walk:
            # LATERAL with LIMIT 1: checked conversation by conversation, newest
            # messages first (an EXISTS would be planned as one scan of every match).
            join = (
                " LEFT JOIN LATERAL (SELECT true AS hit FROM conversation_message cm "
                "WHERE cm.church_id = c.church_id AND cm.conversation_id = c.id "
                f"AND {_BODY_MATCHES} ORDER BY cm.created_at DESC LIMIT 1) body ON true"
            )
            join_params.append(words)
            matches.append("body.hit")
        else:
            # Every matching message's conversation, gathered once (a hashed subplan).
            matches.append(
                "c.id IN (SELECT cm.conversation_id FROM conversation_message cm "
                f"WHERE cm.church_id = %s AND {_BODY_MATCHES})"
            )
            match_params += [church_id, words]
    params: list[Any] = [*join_params, church_id]
    clauses = ["c.church_id = %s"]
    _filters(where, clauses, params)
    if after is not None:
        clauses.append("(c.last_message_at, c.id) < (%s, %s)")
        params += [after.at, after.id]
    clauses.append(f"({' OR '.join(matches)})")
    cur = await conn.execute(
        f"SELECT {_CONV} FROM conversation c{join} WHERE {' AND '.join(clauses)} "
        "ORDER BY c.last_message_at DESC, c.id DESC LIMIT %s",
        # The match clause is last in the WHERE, so its parameters follow the others.
        [*params, *match_params, limit + 1],
        prepare=False,
    )
    rows = [Conversation(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (r.last_message_at, r.id))
