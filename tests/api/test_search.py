"""Conversation search: ``GET /v1/conversations?q=`` (PROTOCOL.md "The inbox").

One church (and a neighbour holding look-alikes of its data: the same name, the same
phone number, the same words) is seeded once through the real paths, inbound texts
through the provider simulator and staff replies through the API, then searched.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import psycopg
import pytest

from deploy.stack import Stack
from storage.domain.phones import PhoneVault
from storage.pg.conversation_search import (
    Strategy,
    prefix_query,
    search_conversations,
    without_compounds,
)
from storage.pg.conversations import ConversationFilter
from tests.conftest import Church, unique_phone, wait_until

HARVEST = 5
"""Conversations whose first text says "harvest": enough for pages of two."""


class Seeded(msgspec.Struct):
    church: Church
    other: Church
    by_name: dict[str, str]
    """Conversation id per member first name (the church's)."""
    other_by_name: dict[str, str]
    phone: str
    """Marisol's number, in both churches."""


def _text(sim_url: str, church: Church, phone: str, text: str) -> None:
    sent = httpx.post(
        f"{sim_url}/_sim/inbound", json={"from": phone, "to": church.phone_number, "text": text}
    )
    assert sent.status_code < 300, sent.text


def _conversations(church: Church, count: int) -> dict[str, str]:
    """Conversation id per member id, once ``count`` conversations exist."""
    found: dict[str, str] = {}

    def all_there() -> bool:
        data = church.api.get("/v1/conversations", params={"limit": 200}).json()["data"]
        found.update({c["member_id"]: c["id"] for c in data})
        return len(found) >= count

    wait_until(all_there, 15, "the inbound texts became conversations")
    return found


def _member(church: Church, first: str, last: str, phone: str) -> str:
    return church.member(phone, first_name=first, last_name=last)


@pytest.fixture(scope="module")
def seeded(base_url: str, sim_url: str) -> Iterator[Seeded]:
    church, other = Church(base_url), Church(base_url)
    phone = unique_phone()
    people: list[tuple[str, str, str, str]] = [
        ("Marisol", "Quintero", phone, "Can someone pick me up for the retreat?"),
        ("Ada", "Lovelace", unique_phone(), "Is the potluck tomorrow?"),
        ("Bob", "Zephyr", unique_phone(), "Hello, it's Bob (O'Brien's cousin) :* & |"),
    ]
    people += [
        (f"Harvest{i}", "Helper", unique_phone(), f"I can help at the harvest festival {i}")
        for i in range(HARVEST)
    ]
    members = {first: _member(church, first, last, p) for first, last, p, _ in people}
    for _, _, p, text in people:
        _text(sim_url, church, p, text)
    # The neighbour: the same name, the same number, the same words.
    twin = _member(other, "Marisol", "Quintero", phone)
    _text(sim_url, other, phone, "Can someone pick me up for the retreat? harvest potluck")
    ids = _conversations(church, len(people))
    other_ids = _conversations(other, 1)
    by_name = {first: ids[member] for first, member in members.items()}
    # A staff reply: outbound texts are searched too.
    reply = church.api.post(
        f"/v1/conversations/{by_name['Ada']}/messages",
        json={"body": "Yes! Bring a casserole, thanks"},
    )
    assert reply.status_code == 202, reply.text
    closed = church.api.patch(f"/v1/conversations/{by_name['Harvest1']}", json={"status": "closed"})
    assert closed.status_code == 200, closed.text
    yield Seeded(church, other, by_name, {"Marisol": other_ids[twin]}, phone)
    church.close()
    other.close()


def _search(church: Church, q: str, **params: Any) -> list[str]:
    answer = church.api.get("/v1/conversations", params={"q": q, **params})
    assert answer.status_code == 200, answer.text
    return [c["id"] for c in answer.json()["data"]]


def test_a_name_matches_every_word_in_any_order_the_last_as_a_prefix(seeded: Seeded) -> None:
    marisol = seeded.by_name["Marisol"]
    assert _search(seeded.church, "Marisol Quintero") == [marisol]
    assert _search(seeded.church, "quintero MARISOL") == [marisol]
    assert _search(seeded.church, "Marisol Quin") == [marisol]
    assert _search(seeded.church, "Mar") == [marisol]
    # Only the last word is a prefix, and only from three letters.
    assert _search(seeded.church, "Mari Quintero") == []
    assert _search(seeded.church, "Ma") == []
    # Every word: one that is in no name (nor text) leaves nothing.
    assert _search(seeded.church, "Marisol Lovelace") == []
    assert _search(seeded.church, "zzyzx") == []


def test_a_message_matches_when_one_message_holds_every_word(seeded: Seeded) -> None:
    ada, marisol = seeded.by_name["Ada"], seeded.by_name["Marisol"]
    assert _search(seeded.church, "pick retreat") == [marisol]
    assert _search(seeded.church, "RETREAT?! pick-me") == [marisol]
    assert _search(seeded.church, "casserole") == [ada]  # the staff reply
    assert _search(seeded.church, "potluck") == [ada]
    # Two messages of one conversation, one word each: not a match.
    assert _search(seeded.church, "potluck casserole") == []


def test_punctuation_and_query_syntax_are_only_words(seeded: Seeded) -> None:
    bob = seeded.by_name["Bob"]
    assert _search(seeded.church, "o'brien's") == [bob]
    assert _search(seeded.church, "(cousin) :* & |") == [bob]
    for q in ("!!!", "'", "\\", ":*", "&|!()<->", "'' OR 1=1 --", "%_"):
        assert _search(seeded.church, q) == [], q


def test_a_full_phone_number_matches_by_its_hash_and_a_partial_one_does_not(
    seeded: Seeded,
) -> None:
    marisol = seeded.by_name["Marisol"]
    national = f"({seeded.phone[2:5]}) {seeded.phone[5:8]}-{seeded.phone[8:]}"
    assert _search(seeded.church, seeded.phone) == [marisol]
    assert _search(seeded.church, national) == [marisol]
    assert _search(seeded.church, seeded.phone[2:]) == [marisol]
    for partial in (seeded.phone[:-1], seeded.phone[5:], seeded.phone[2:8], seeded.phone[-4:]):
        assert _search(seeded.church, partial) == [], partial


def test_another_churchs_conversations_are_never_found(seeded: Seeded) -> None:
    mine = set(seeded.by_name.values())
    theirs = seeded.other_by_name["Marisol"]
    for q in ("Marisol", seeded.phone, "retreat", "harvest", "potluck"):
        found = _search(seeded.church, q)
        assert theirs not in found, q
        assert set(found) <= mine, q
        assert _search(seeded.other, q) == [theirs], q


def test_results_are_keyset_paged_most_recent_first(seeded: Seeded) -> None:
    expected = [
        c["id"]
        for c in seeded.church.api.get("/v1/conversations", params={"limit": 200}).json()["data"]
        if c["id"] in {seeded.by_name[f"Harvest{i}"] for i in range(HARVEST)}
    ]
    assert len(expected) == HARVEST
    seen: list[str] = []
    cursor = None
    for _ in range(HARVEST):
        params = {"q": "harvest festival", "limit": 2, **({"cursor": cursor} if cursor else {})}
        answer = seeded.church.api.get("/v1/conversations", params=params)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        seen += [c["id"] for c in body["data"]]
        cursor = body["meta"]["next_cursor"]
        if cursor is None:
            break
    assert seen == expected


def test_search_combines_with_the_list_filters(seeded: Seeded) -> None:
    closed = seeded.by_name["Harvest1"]
    assert _search(seeded.church, "harvest", status="closed") == [closed]
    opened = _search(seeded.church, "harvest", status="open")
    assert len(opened) == HARVEST - 1
    assert closed not in opened
    assert _search(seeded.church, "Marisol", status="closed") == []


@pytest.mark.parametrize("q", ["", "   ", "x" * 201, "nul\x00byte"])
def test_an_empty_blank_or_oversized_q_is_refused(seeded: Seeded, q: str) -> None:
    answer = seeded.church.api.get("/v1/conversations", params={"q": q})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "validation_error"
    assert [d["field"] for d in error["details"]] == ["q"]
    assert _search(seeded.church, "x" * 200) == []


def test_common_words_walk_the_inbox_and_find_what_the_set_finds(
    seeded: Seeded, stack: Stack
) -> None:
    """The walk (for words common enough, storage/pg/conversation_search.py) is
    forced here and must answer exactly as the set of matches does, page by page; and
    the choice left to the planner's estimates answers alike too."""
    env = stack.env
    vault = PhoneVault(
        base64.b64decode(env["KOINONIA_PHONE_KEY"]), base64.b64decode(env["KOINONIA_LOOKUP_KEY"])
    )
    church_id = uuid.UUID(seeded.church.id)

    async def pages(
        q: str, strategy: Strategy, where: ConversationFilter | None
    ) -> list[list[uuid.UUID]]:
        found: list[list[uuid.UUID]] = []
        cursor = None
        async with await psycopg.AsyncConnection.connect(env["DATABASE_URL"]) as conn:
            for _ in range(10):
                page = await search_conversations(
                    conn,
                    church_id,
                    vault,
                    q=q,
                    limit=2,
                    cursor=cursor,
                    where=where,
                    strategy=strategy,
                )
                found.append([c.id for c in page.items])
                cursor = page.next_cursor
                if cursor is None:
                    break
        return found

    for q, where in (
        ("harvest", None),
        ("harvest", ConversationFilter(status="open")),
        ("pick retreat", None),
        ("potluck casserole", None),
        ("marisol", None),
        (seeded.phone, None),
    ):
        probed = asyncio.run(pages(q, "set", where))
        walked = asyncio.run(pages(q, "walk", where))
        assert walked == probed, q
        assert asyncio.run(pages(q, "auto", where)) == probed, q
        assert any(probed) == (q != "potluck casserole"), q


def test_hyphenated_words_are_their_parts() -> None:
    assert without_compounds(["me", "pick", "pick-me", "-4567", "x-ray"]) == [
        "me",
        "pick",
        "-4567",
        "x-ray",
    ]


def test_the_query_keeps_only_words() -> None:
    assert prefix_query([]) is None
    assert prefix_query(["o'brien", "back\\slash", "10am", "ana"]) == (
        "'o''brien' & 'back\\\\slash' & '10am' & 'ana':*"
    )
    assert prefix_query(["ana", "2026"]) == "'ana' & '2026'"
    assert prefix_query(["ana", "al"]) == "'ana' & 'al'"
