"""Branches, groups and members against the running stack: CRUD, search and filters,
consent, the data export and erasure, cached group counts, tenancy, pagination."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import redis

from deploy.stack import Stack
from storage.redis import key_names
from tests.conftest import Church, unique_phone, wait_until


def _data(answer: httpx.Response, status: int = 200) -> Any:
    assert answer.status_code == status, answer.text
    return answer.json()["data"]


def _error(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    return error


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _ids(answer: httpx.Response) -> set[str]:
    return {m["id"] for m in _data(answer)}


def test_branches_crud_and_delete_refused_while_in_use(church: Church) -> None:
    north = _data(church.api.post("/v1/branches", json={"name": "North"}), 201)
    assert north["name"] == "North"
    south = _data(church.api.post("/v1/branches", json={"name": "South"}), 201)
    taken = _error(church.api.post("/v1/branches", json={"name": " north "}), 409)
    assert taken["details"][0]["field"] == "name"
    assert _data(church.api.get(f"/v1/branches/{north['id']}"))["name"] == "North"
    renamed = _data(church.api.patch(f"/v1/branches/{north['id']}", json={"name": "Northside"}))
    assert renamed["name"] == "Northside"
    page = church.api.get("/v1/branches", params={"limit": 1}).json()
    assert len(page["data"]) == 1
    rest = church.api.get("/v1/branches", params={"cursor": page["meta"]["next_cursor"]}).json()
    assert {b["id"] for b in page["data"] + rest["data"]} == {north["id"], south["id"]}

    group = _data(
        church.api.post("/v1/groups", json={"name": "Ushers", "branch_id": north["id"]}), 201
    )
    assert group["branch_id"] == north["id"]
    member = church.member(unique_phone(), branch_id=north["id"])
    assert _data(church.api.get(f"/v1/members/{member}"))["branch_id"] == north["id"]

    refused = _error(church.api.delete(f"/v1/branches/{north['id']}"), 409)
    assert "1 group(s) and 1 member(s)" in refused["message"]
    moved = church.api.patch(f"/v1/groups/{group['id']}", json={"branch_id": south["id"]})
    assert _data(moved)["branch_id"] == south["id"]
    _error(church.api.delete(f"/v1/branches/{north['id']}"), 409)
    left = church.api.patch(f"/v1/members/{member}", json={"branch_id": None})
    assert _data(left)["branch_id"] is None
    assert _data(church.api.delete(f"/v1/branches/{north['id']}")) == {
        "id": north["id"],
        "deleted": True,
    }
    _error(church.api.get(f"/v1/branches/{north['id']}"), 404)
    _error(church.api.delete(f"/v1/branches/{north['id']}"), 404)


def test_another_churchs_ids_are_not_found_on_every_new_route(
    church: Church, other_church: Church
) -> None:
    branch = _data(other_church.api.post("/v1/branches", json={"name": "Theirs"}), 201)["id"]
    group = other_church.group("Theirs")
    member = other_church.member(unique_phone(), [group])
    template = _data(other_church.api.post("/v1/templates", json={"name": "T", "body": "Hi"}), 201)[
        "id"
    ]
    mine = church.member(unique_phone())
    my_group = church.group()
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"/v1/branches/{branch}", None),
        ("PATCH", f"/v1/branches/{branch}", {"name": "Mine now"}),
        ("DELETE", f"/v1/branches/{branch}", None),
        ("GET", f"/v1/groups/{group}", None),
        ("PATCH", f"/v1/groups/{group}", {"name": "Mine now"}),
        ("DELETE", f"/v1/groups/{group}", None),
        ("POST", f"/v1/groups/{group}/members", {"member_ids": [mine]}),
        ("DELETE", f"/v1/groups/{group}/members/{member}", None),
        ("GET", f"/v1/members/{member}", None),
        ("PATCH", f"/v1/members/{member}", {"first_name": "Mine"}),
        ("POST", f"/v1/members/{member}/opt-out", None),
        ("POST", f"/v1/members/{member}/opt-in", None),
        ("GET", f"/v1/members/{member}/export", None),
        ("DELETE", f"/v1/members/{member}", None),
        ("GET", f"/v1/templates/{template}", None),
        ("PATCH", f"/v1/templates/{template}", {"body": "Mine"}),
        ("DELETE", f"/v1/templates/{template}", None),
        ("GET", f"/v1/members?group_id={group}", None),
        ("GET", f"/v1/members?branch_id={branch}", None),
        ("POST", "/v1/groups", {"name": "G", "branch_id": branch}),
        ("PATCH", f"/v1/groups/{my_group}", {"branch_id": branch}),
        ("POST", "/v1/members", {"first_name": "A", "phone": unique_phone(), "branch_id": branch}),
        ("PATCH", f"/v1/members/{mine}", {"branch_id": branch}),
        ("POST", f"/v1/groups/{my_group}/members", {"member_ids": [member]}),
    ]
    for method, path, body in calls:
        answer = church.api.request(method, path, json=body)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"]["code"] == "not_found"
        # The session (owner) sees the same.
        assert church.session.request(method, path, json=body).status_code == 404, path
    # Nothing of theirs changed, nothing of theirs is listed.
    assert _data(other_church.api.get(f"/v1/members/{member}"))["first_name"] == "Ada"
    assert _data(other_church.api.get(f"/v1/groups/{group}"))["member_count"] == 1
    assert _data(other_church.api.get(f"/v1/templates/{template}"))["body"] == "Hi"
    assert _ids(church.api.get("/v1/members")) == {mine}
    assert [b["id"] for b in _data(church.api.get("/v1/branches"))] == []


def test_validation_errors_name_their_fields(church: Church) -> None:
    group = church.group()
    member = church.member(unique_phone())
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", "/v1/branches", {}, "name"),
        ("POST", "/v1/branches", {"name": "   "}, "name"),
        ("POST", "/v1/groups", {"name": "G", "branch_id": "nope"}, "branch_id"),
        ("PATCH", f"/v1/groups/{group}", {"name": ""}, "name"),
        ("PATCH", f"/v1/groups/{group}", {"colour": "red"}, "colour"),
        ("PATCH", f"/v1/members/{member}", {"branch_id": 7}, "branch_id"),
        ("PATCH", f"/v1/members/{member}", {"email": "not an email"}, "email"),
        ("POST", "/v1/members", {"first_name": "A", "phone": "+1 nope"}, "phone"),
        # Postgres text holds no NUL: refused up front, never a 500.
        ("POST", "/v1/branches", {"name": "a\x00b"}, "name"),
        ("POST", "/v1/groups", {"name": "a\x00b"}, "name"),
        ("PATCH", f"/v1/members/{member}", {"last_name": "\x00"}, "last_name"),
        ("PATCH", f"/v1/members/{member}", {"email": "a\x00@example.org"}, "email"),
    ]
    for method, path, body, field in cases:
        error = _error(church.api.request(method, path, json=body), 422)
        assert error["code"] == "validation_error"
        assert error["details"][0]["field"] == field, (path, body, error)
    for params, field in [
        ({"opted_in": "maybe"}, "opted_in"),
        ({"group_id": "nope"}, "group_id"),
        ({"branch_id": "x"}, "branch_id"),
        ({"q": "x" * 201}, "q"),
        ({"q": "a\x00"}, "q"),
        ({"limit": 0}, "limit"),
    ]:
        error = _error(church.api.get("/v1/members", params=params), 422)
        assert error["details"][0]["field"] == field


def test_search_by_name_and_phone(church: Church) -> None:
    grace_phone = unique_phone()
    grace = church.member(grace_phone, first_name="Grace", last_name="Hopper")
    ada = church.member(unique_phone(), first_name="Ada", last_name="Lovelace")
    alan = church.member(unique_phone(), first_name="Alan", last_name="Turing")
    church.member(unique_phone(), first_name="100%", last_name="Sure_Thing")

    def search(q: str) -> set[str]:
        return _ids(church.api.get("/v1/members", params={"q": q}))

    assert search("gra") == {grace}
    assert search("HOPP") == {grace}
    assert search("love") == {ada}
    assert search("ada love") == {ada}
    assert search("a") >= {grace, ada, alan}
    assert search("ring") == {alan}
    assert search("zzz") == set()
    # LIKE wildcards are searched for literally.
    assert len(search("%")) == 1
    assert search("Gr_ce") == set()
    # A phone number, in any format the church's country reads, matches exactly.
    assert search(grace_phone) == {grace}
    national = f"({grace_phone[2:5]}) {grace_phone[5:8]}-{grace_phone[8:]}"
    assert search(national) == {grace}
    assert search(grace_phone[:-1] + ("0" if grace_phone[-1] != "0" else "1")) == set()


def test_filters_combine(church: Church) -> None:
    branch = _data(church.api.post("/v1/branches", json={"name": "East"}), 201)["id"]
    choir, youth = church.group("Choir"), church.group("Youth")
    a = church.member(unique_phone(), [choir], branch_id=branch)
    b = church.member(unique_phone(), [choir, youth])
    c = church.member(unique_phone(), [youth], branch_id=branch)
    d = church.member(unique_phone())
    _data(church.api.post(f"/v1/members/{b}/opt-out"))

    def listed(**params: Any) -> set[str]:
        return _ids(church.api.get("/v1/members", params=params))

    assert listed() == {a, b, c, d}
    assert listed(group_id=choir) == {a, b}
    assert listed(group_id=youth) == {b, c}
    assert listed(branch_id=branch) == {a, c}
    assert listed(opted_in="false") == {b}
    assert listed(opted_in="true") == {a, c, d}
    assert listed(group_id=choir, opted_in="true") == {a}
    assert listed(group_id=youth, branch_id=branch) == {c}
    member = _data(church.api.get(f"/v1/members/{b}"))
    assert sorted(member["group_ids"]) == sorted([choir, youth])


def test_opt_out_and_in_record_source_and_time(church: Church) -> None:
    member = church.member(unique_phone())
    created = _data(church.api.get(f"/v1/members/{member}"))
    assert created["opted_in"] is True
    assert created["opt_source"] == "api"

    out = _data(church.session.post(f"/v1/members/{member}/opt-out"))
    assert out["opted_in"] is False
    assert out["opt_source"] == "staff"
    assert _at(out["opt_changed_at"]) > _at(created["opt_changed_at"])
    # Opting out again changes nothing, not even the time consent was withdrawn.
    again = _data(church.api.post(f"/v1/members/{member}/opt-out"))
    assert (again["opt_source"], again["opt_changed_at"]) == ("staff", out["opt_changed_at"])

    back = _data(church.api.post(f"/v1/members/{member}/opt-in"))
    assert back["opted_in"] is True
    assert back["opt_source"] == "api"
    assert _at(back["opt_changed_at"]) > _at(out["opt_changed_at"])
    # A read-only key may not change consent.
    key = church.session.post("/v1/api-keys", json={"name": "ro", "scopes": ["read"]})
    with httpx.Client(
        base_url=str(church.api.base_url),
        headers={"Authorization": f"Bearer {key.json()['data']['key']}"},
    ) as reader:
        assert reader.post(f"/v1/members/{member}/opt-out").status_code == 403
    session_made = _data(
        church.session.post("/v1/members", json={"first_name": "S", "phone": unique_phone()}),
        201,
    )
    assert session_made["opt_source"] == "staff"


def test_opted_out_member_is_skipped_by_broadcasts(church: Church) -> None:
    group = church.group()
    church.member(unique_phone(), [group])
    out = church.member(unique_phone(), [group])
    _data(church.api.post(f"/v1/members/{out}/opt-out"))
    message = church.broadcast(group)
    counts = church.counts_when(message, lambda c: c["delivered"] == 1)
    assert counts["delivered"] == 1


def test_export_holds_everything_then_erasure_removes_it(church: Church, sim_url: str) -> None:
    group = church.group("Choir")
    phone = unique_phone()
    member = church.member(phone, [group], email="ada@example.org")
    _data(church.session.post(f"/v1/members/{member}/opt-out"))
    _data(church.api.post(f"/v1/members/{member}/opt-in"))
    message = church.broadcast(group, "Choir practice at 7")
    church.counts_when(message, lambda c: c["delivered"] == 1)
    sent = httpx.post(
        f"{sim_url}/_sim/inbound",
        json={"from": phone, "to": church.phone_number, "text": "See you there"},
    )
    assert sent.status_code < 300, sent.text
    church.conversations_when(1)

    export = _data(church.api.get(f"/v1/members/{member}/export"))
    profile = export["member"]
    assert profile["id"] == member
    assert profile["phone"] == phone
    assert profile["email"] == "ada@example.org"
    assert (profile["first_name"], profile["last_name"]) == ("Ada", "Lovelace")
    assert [g["group_id"] for g in export["groups"]] == [group]
    assert export["groups"][0]["name"] == "Choir"
    history = [(e["opted_in"], e["source"]) for e in export["opt_history"]]
    assert history == [(True, "api"), (False, "staff"), (True, "api")]
    assert len(export["broadcasts"]) == 1
    recipient = export["broadcasts"][0]
    assert recipient["message_id"] == message
    assert recipient["body"] == "Choir practice at 7"
    assert recipient["status"] == "delivered"
    assert len(export["conversations"]) == 1
    bodies = [m["body"] for m in export["conversations"][0]["messages"]]
    assert "See you there" in bodies
    # The owner's session may export too (API keys count as admins).
    assert church.session.get(f"/v1/members/{member}/export").status_code == 200

    _data(church.api.delete(f"/v1/members/{member}"))
    _error(church.api.get(f"/v1/members/{member}/export"), 404)
    _error(church.api.post(f"/v1/members/{member}/opt-in"), 404)
    assert member not in _ids(church.api.get("/v1/members"))
    assert _ids(church.api.get("/v1/members", params={"q": phone})) == set()
    conversation = church.api.get("/v1/conversations").json()["data"][0]
    thread = church.api.get(f"/v1/conversations/{conversation['id']}/messages").json()["data"]
    assert all(m["body"] != "See you there" for m in thread)
    assert _data(church.api.get(f"/v1/messages/{message}"))["recipient_count"] == 1


def test_group_counts_are_cached_and_invalidated(church: Church, stack: Stack) -> None:
    group = church.group("Cached")
    first = church.member(unique_phone(), [group])

    def count() -> int:
        shown = _data(church.api.get(f"/v1/groups/{group}"))["member_count"]
        listed = {g["id"]: g["member_count"] for g in _data(church.api.get("/v1/groups"))}
        assert listed[group] == shown
        return int(shown)

    assert count() == 1
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        cached = key_names.cached(uuid.UUID(church.id), f"groups:group:{group}")
        assert client.exists(cached), "the group was not cached"
    finally:
        client.close()
    second = church.member(unique_phone())
    _data(church.api.post(f"/v1/groups/{group}/members", json={"member_ids": [second]}))
    assert count() == 2
    _data(church.api.delete(f"/v1/groups/{group}/members/{first}"))
    assert count() == 1
    church.member(unique_phone(), [group])
    assert count() == 2
    _data(church.api.delete(f"/v1/members/{second}"))
    assert count() == 1
    renamed = _data(church.api.patch(f"/v1/groups/{group}", json={"name": "Renamed"}))
    assert renamed["name"] == "Renamed"
    assert _data(church.api.get(f"/v1/groups/{group}"))["name"] == "Renamed"
    assert count() == 1


def test_group_delete_keeps_members_and_past_counts(church: Church) -> None:
    group = church.group("Leaving")
    other = church.group("Staying")
    members = [church.member(unique_phone(), [group, other]) for _ in range(2)]
    message = church.broadcast(group)
    church.counts_when(message, lambda c: c["delivered"] == 2)
    gone = _data(church.api.delete(f"/v1/groups/{group}"))
    assert gone == {"id": group, "deleted": True}
    _error(church.api.get(f"/v1/groups/{group}"), 404)
    assert group not in {g["id"] for g in _data(church.api.get("/v1/groups"))}
    for member in members:
        assert _data(church.api.get(f"/v1/members/{member}"))["group_ids"] == [other]
    detail = _data(church.api.get(f"/v1/messages/{message}"))
    assert detail["recipient_count"] == 2
    assert detail["counts"]["delivered"] == 2
    assert _data(church.api.get(f"/v1/groups/{other}"))["member_count"] == 2


def _grew(items: list[str], size: int) -> Callable[[], bool]:
    return lambda: len(items) > size


def test_member_pages_neither_skip_nor_repeat_during_inserts(church: Church) -> None:
    existing = {church.member(unique_phone()) for _ in range(35)}
    stop = threading.Event()
    inserted: list[str] = []

    def insert() -> None:
        with httpx.Client(
            base_url=str(church.api.base_url), headers=dict(church.api.headers), timeout=10
        ) as client:
            while not stop.is_set():
                answer = client.post(
                    "/v1/members", json={"first_name": "New", "phone": unique_phone()}
                )
                assert answer.status_code == 201, answer.text
                inserted.append(answer.json()["data"]["id"])

    writer = threading.Thread(target=insert)
    writer.start()
    try:
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 10} | ({"cursor": cursor} if cursor else {})
            page = church.api.get("/v1/members", params=params).json()
            seen += [m["id"] for m in page["data"]]
            cursor = page["meta"]["next_cursor"]
            if cursor is None:
                break
            # At least one insert between two pages, however busy the machine: a
            # test whose pages all came before the first insert would prove nothing.
            wait_until(_grew(inserted, len(inserted)), 10, "an insert between two pages")
            if len(seen) > 2000:
                break
    finally:
        stop.set()
        writer.join()
    assert inserted, "nothing was inserted while paging"
    assert len(seen) == len(set(seen)), "a member was listed twice"
    assert existing <= set(seen), "a member was skipped"
    assert set(seen) <= existing | set(inserted)
