"""/v1/keywords: keywords that join groups (create, list, delete) and what the API
refuses: malformed and reserved words (422), a word the church already has in any
case (409), a group that is not the church's (404); nothing written on any of them."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest

from deploy.stack import Stack
from storage.pg.group_keywords import candidate, keyword_problem, match_key
from tests.conftest import Church

REPLY = "Welcome to Youth Group texts! Reply STOP to opt out."


def _keywords(church: Church) -> list[dict[str, Any]]:
    answer = church.api.get("/v1/keywords", params={"limit": 200})
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["data"]
    return found


def _rows(stack: Stack, church: Church) -> int:
    """The church's keyword rows, read from the database itself."""
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM group_keyword WHERE church_id = %s", (uuid.UUID(church.id),)
        ).fetchone()
    assert row is not None
    return int(row[0])


def _error(answer: Any, status: int, code: str, field: str | None = None) -> None:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code, error
    if field is not None:
        assert [d["field"] for d in error["details"]] == [field], error


# -- rules (no I/O) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("youth", "YOUTH"),
        ("  Youth! ", "YOUTH"),
        ("JOIN youth", "YOUTH"),
        ("join   Youth.", "YOUTH"),
        ("Join", "JOIN"),
        ("vbs2026", "VBS2026"),
        ("únete", "ÚNETE"),
        ("u\u0301nete", "ÚNETE"),  # a combining accent is the same letter
        ("join youth group", None),
        ("see you at youth", None),
        ("", None),
        ("?!", None),
    ],
)
def test_inbound_texts_name_a_keyword_when_whole(text: str, key: str | None) -> None:
    assert candidate(text) == key


@pytest.mark.parametrize(
    "word", ["STOP", "stop", "StopAll", "unsubscribe", "start", "Yes", "HELP", "info", "optout"]
)
def test_sms_keywords_are_reserved(word: str) -> None:
    assert keyword_problem(word) is not None


@pytest.mark.parametrize("word", ["two words", "join-us", "a_b", "youth!", "x" * 33, ""])
def test_a_keyword_is_one_word_of_letters_and_digits(word: str) -> None:
    assert keyword_problem(word) is not None


def test_good_keywords_pass() -> None:
    for word in ("YOUTH", "vbs2026", "Únete", "x" * 32, "Join"):
        assert keyword_problem(word) is None, word
    assert match_key("Youth") == match_key("YOUTH") == "YOUTH"


# -- against the stack -------------------------------------------------------------------------


def test_create_list_and_delete(church: Church, other_church: Church, stack: Stack) -> None:
    group = church.group("Youth")
    made = church.api.post(
        "/v1/keywords",
        json={"keyword": "Youth", "group_id": group, "reply": REPLY, "repeat_reply": "Again!"},
    )
    assert made.status_code == 201, made.text
    created = made.json()["data"]
    assert created["keyword"] == "Youth"
    assert created["group_id"] == group
    assert created["reply"] == REPLY
    assert created["repeat_reply"] == "Again!"
    second = church.api.post(
        "/v1/keywords", json={"keyword": "VBS2026", "group_id": group, "reply": "VBS!"}
    )
    assert second.status_code == 201, second.text
    assert second.json()["data"]["repeat_reply"] is None
    assert [k["id"] for k in _keywords(church)] == [created["id"], second.json()["data"]["id"]]

    # Keyset paging like every list.
    page = church.api.get("/v1/keywords", params={"limit": 1}).json()
    assert [k["id"] for k in page["data"]] == [created["id"]]
    assert page["meta"]["next_cursor"]
    rest = church.api.get(
        "/v1/keywords", params={"limit": 1, "cursor": page["meta"]["next_cursor"]}
    ).json()
    assert [k["id"] for k in rest["data"]] == [second.json()["data"]["id"]]
    assert rest["meta"]["next_cursor"] is None

    # Each church has its own words: the same word elsewhere is no conflict, and
    # neither church sees or deletes the other's.
    theirs = other_church.api.post(
        "/v1/keywords",
        json={"keyword": "YOUTH", "group_id": other_church.group(), "reply": "Theirs"},
    )
    assert theirs.status_code == 201, theirs.text
    assert [k["keyword"] for k in _keywords(other_church)] == ["YOUTH"]
    _error(church.api.delete(f"/v1/keywords/{theirs.json()['data']['id']}"), 404, "not_found")
    assert len(_keywords(other_church)) == 1

    gone = church.api.delete(f"/v1/keywords/{created['id']}")
    assert gone.status_code == 200, gone.text
    assert gone.json()["data"] == {"id": created["id"], "deleted": True}
    _error(church.api.delete(f"/v1/keywords/{created['id']}"), 404, "not_found")
    assert [k["keyword"] for k in _keywords(church)] == ["VBS2026"]
    assert _rows(stack, church) == 1

    # Deleting the group takes its keywords with it.
    assert church.api.delete(f"/v1/groups/{group}").status_code == 200
    assert _keywords(church) == []
    # The word is free again.
    again = church.api.post(
        "/v1/keywords", json={"keyword": "youth", "group_id": church.group(), "reply": "Hi"}
    )
    assert again.status_code == 201, again.text


def test_bad_keywords_are_refused_and_nothing_is_written(
    church: Church, other_church: Church, stack: Stack
) -> None:
    group = church.group("Youth")
    taken = church.api.post(
        "/v1/keywords", json={"keyword": "Youth", "group_id": group, "reply": REPLY}
    )
    assert taken.status_code == 201, taken.text

    # The same word in any case: 409 on the field.
    for word in ("youth", "YOUTH", "yOuTh"):
        answer = church.api.post(
            "/v1/keywords", json={"keyword": word, "group_id": group, "reply": REPLY}
        )
        _error(answer, 409, "conflict", "keyword")

    # The opt-out, opt-in and help words, and anything that is not one word of
    # letters and digits: 422 on the field.
    for word in ("STOP", "stop", "Unsubscribe", "START", "yes", "Help", "INFO", "StopAll"):
        answer = church.api.post(
            "/v1/keywords", json={"keyword": word, "group_id": group, "reply": REPLY}
        )
        _error(answer, 422, "validation_error", "keyword")
        assert "reserve" in answer.json()["error"]["details"][0]["message"]
    for word in ("two words", "join-us", "a_b", "youth!", "", "x" * 33, "nul\u0000"):
        answer = church.api.post(
            "/v1/keywords", json={"keyword": word, "group_id": group, "reply": REPLY}
        )
        _error(answer, 422, "validation_error", "keyword")

    # Answers: present, not blank, not too long.
    for body, field in (
        ({"keyword": "Choir", "group_id": group}, "reply"),
        ({"keyword": "Choir", "group_id": group, "reply": ""}, "reply"),
        ({"keyword": "Choir", "group_id": group, "reply": "   "}, "reply"),
        ({"keyword": "Choir", "group_id": group, "reply": "x" * 481}, "reply"),
        (
            {"keyword": "Choir", "group_id": group, "reply": "Hi", "repeat_reply": " "},
            "repeat_reply",
        ),
        ({"keyword": "Choir", "group_id": "not-an-id", "reply": "Hi"}, "group_id"),
    ):
        _error(church.api.post("/v1/keywords", json=body), 422, "validation_error", field)
    unknown = church.api.post(
        "/v1/keywords", json={"keyword": "Choir", "group_id": group, "reply": "Hi", "extra": 1}
    )
    _error(unknown, 422, "validation_error")

    # Another church's group, or none at all: not found, and nothing said about it.
    foreign = other_church.group("Their youth")
    for group_id in (foreign, str(uuid.uuid4())):
        answer = church.api.post(
            "/v1/keywords", json={"keyword": "Choir", "group_id": group_id, "reply": "Hi"}
        )
        _error(answer, 404, "not_found")
        assert foreign not in answer.text

    assert [k["keyword"] for k in _keywords(church)] == ["Youth"]
    assert _rows(stack, church) == 1
    assert _rows(stack, other_church) == 0
    # The word refused for the foreign group is still free.
    free = church.api.post(
        "/v1/keywords", json={"keyword": "Choir", "group_id": group, "reply": "Hi"}
    )
    assert free.status_code == 201, free.text


def test_read_only_keys_list_but_cannot_write(church: Church, base_url: str) -> None:
    made = church.session.post("/v1/api-keys", json={"name": "ro", "scopes": ["read"]})
    assert made.status_code == 201, made.text
    headers = {"Authorization": f"Bearer {made.json()['data']['key']}"}
    group = church.group()
    with httpx.Client(base_url=base_url, headers=headers, timeout=10.0) as reader:
        assert reader.get("/v1/keywords").status_code == 200
        refused = reader.post(
            "/v1/keywords", json={"keyword": "Choir", "group_id": group, "reply": "Hi"}
        )
        _error(refused, 403, "forbidden")
    assert _keywords(church) == []
