"""Archived months read through the same endpoints (docs/operations.md "Object store,
retention and archive"): the answers before and after ``koinonia archive`` are the
same but for ``archived``, on file:// (the session stack) and on s3:// (a stack of
its own on moto's S3 server, whose web process caches nothing, so every archived
read goes to the store); ``GET /v1/archive``; erasure; other churches; a store
outage; and the per-process file cache.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from deploy.stack import Stack
from storage.archive.format import VerificationFailed, write_month
from storage.archive.reader import FileCache
from storage.archive.schema import ArchivedRecipient
from storage.objects import ObjectStore, open_object_store
from storage.pg.archive_index import IndexedFile
from storage.process.settings import Settings
from tests.archive_support import before_month, every_page, run_koinonia, stack_objects
from tests.conftest import Church

MONTHS = 15
BACK = 9
"""Archive the months before the current one minus 9: months -14..-10 of the demo's
15, which no other test of the session stack writes (tests/archive_support.py)."""


class Snapshot(msgspec.Struct):
    """Everything the API answers about a church's history."""

    messages: list[dict[str, Any]]
    """``GET /v1/messages`` (live months only)."""
    everything: list[dict[str, Any]]
    """``?include_archived=true``, paged 100 at a time."""
    small_pages: list[dict[str, Any]]
    """The same, 7 at a time: cursors that cross from live rows into the archive."""
    ranged: list[dict[str, Any]]
    """``?include_archived=true&since=&until=&status=completed`` across the boundary."""
    details: dict[str, dict[str, Any]]
    """Every message of the months to archive, and three live ones."""
    recipients: dict[str, list[dict[str, Any]]]
    delivered: dict[str, list[dict[str, Any]]]
    """``?status=delivered`` recipients of some messages, 3 at a time."""
    threads: dict[str, list[dict[str, Any]]]
    small_threads: dict[str, list[dict[str, Any]]]
    archive: list[dict[str, Any]]


def pages(client: httpx.Client, path: str, limit: int, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        answer = client.get(
            path, params={**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        )
        assert answer.status_code == 200, answer.text
        rows += answer.json()["data"]
        cursor = answer.json()["meta"].get("next_cursor")
        if not cursor:
            return rows
    raise AssertionError(f"{path}: more than 1000 pages")


def snapshot(api: httpx.Client, boundary: datetime) -> Snapshot:
    everything = every_page(api, "/v1/messages", include_archived="true")
    conversations = every_page(api, "/v1/conversations")
    # Every message of the months archived, and a few live ones.
    old = [m for m in everything if _created(m) < boundary]
    assert old, "no message in the months to archive"
    shown = [m["id"] for m in old + [m for m in everything if _created(m) >= boundary][:3]]

    def detail(message_id: str) -> dict[str, Any]:
        answer = api.get(f"/v1/messages/{message_id}")
        assert answer.status_code == 200, answer.text
        data: dict[str, Any] = answer.json()["data"]
        return data

    # A few at a time: the sweep is most of this module's time.
    with ThreadPoolExecutor(4) as pool:
        details = dict(zip(shown, pool.map(detail, shown), strict=True))
        recipients = dict(
            zip(
                shown,
                pool.map(lambda i: every_page(api, f"/v1/messages/{i}/recipients"), shown),
                strict=True,
            )
        )
        threads = dict(
            zip(
                [c["id"] for c in conversations],
                pool.map(
                    lambda c: every_page(api, f"/v1/conversations/{c['id']}/messages"),
                    conversations,
                ),
                strict=True,
            )
        )
    some = old[:: max(1, len(old) // 5)]
    return Snapshot(
        messages=every_page(api, "/v1/messages"),
        everything=everything,
        small_pages=pages(api, "/v1/messages", 7, include_archived="true"),
        ranged=every_page(
            api,
            "/v1/messages",
            include_archived="true",
            status="completed",
            since=(boundary - timedelta(days=75)).isoformat(),
            until=(boundary + timedelta(days=40)).isoformat(),
        ),
        details=details,
        recipients=recipients,
        delivered={
            m["id"]: pages(api, f"/v1/messages/{m['id']}/recipients", 3, status="delivered")
            for m in some
        },
        threads=threads,
        small_threads={
            c["id"]: pages(api, f"/v1/conversations/{c['id']}/messages", 4)
            for c in conversations[:: max(1, len(conversations) // 5)]
        },
        archive=api.get("/v1/archive").json()["data"],
    )


class History(msgspec.Struct):
    stack: Stack
    api: httpx.Client
    church_id: str
    boundary: datetime
    """The first instant not archived."""
    before: Snapshot
    after: Snapshot
    report: dict[str, Any]


def _boundary(before: str) -> datetime:
    year, month = before.split("-")
    return datetime(int(year), int(month), 1, tzinfo=UTC)


@pytest.fixture(scope="module", params=["file", "s3"])
def history(request: pytest.FixtureRequest) -> History:
    stack: Stack = request.getfixturevalue(
        "stack" if request.param == "file" else "archive_s3_stack"
    )
    made = run_koinonia(stack, "demo", "--members", "60", "--months", str(MONTHS), "--seed", "5")
    assert made.returncode == 0, made.stderr
    login = json.loads(made.stdout)
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{stack.http_port}",
        timeout=30.0,
        headers={"Authorization": f"Bearer {login['api_key']}"},
    )
    before_arg = before_month(BACK)
    boundary = _boundary(before_arg)
    before = snapshot(api, boundary)
    done = run_koinonia(stack, "archive", "--before", before_arg)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    after = snapshot(api, boundary)
    return History(stack, api, login["church_id"], boundary, before, after, report)


def _created(row: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(row["created_at"])


def _as_archived(rows: list[dict[str, Any]], boundary: datetime) -> list[dict[str, Any]]:
    """``rows`` as they must read once the months before ``boundary`` are archived."""
    out = copy.deepcopy(rows)
    for row in out:
        assert row["archived"] is False, row
        row["archived"] = _created(row) < boundary
    return out


def test_the_archive_run_moved_the_old_months(history: History) -> None:
    # The demo's history reaches well past the boundary on both sides.
    created = [_created(m) for m in history.before.everything]
    assert min(created) < history.boundary <= max(created)
    assert history.report["before"] == f"{history.boundary:%Y-%m}"
    assert history.before.archive == []
    # Live months only, by default: the archived ones left the default list.
    assert history.after.messages == [
        m for m in history.before.messages if _created(m) >= history.boundary
    ]
    assert all(m["archived"] is False for m in history.after.messages)


def test_lists_read_the_same_but_for_archived(history: History) -> None:
    b, a, edge = history.before, history.after, history.boundary
    assert a.everything == _as_archived(b.everything, edge)
    assert any(m["archived"] for m in a.everything)
    assert a.small_pages == a.everything
    assert b.small_pages == b.everything
    assert a.ranged == _as_archived(b.ranged, edge)
    assert {m["archived"] for m in a.ranged} == {True, False}


def test_details_and_recipients_read_the_same_but_for_archived(history: History) -> None:
    b, a, edge = history.before, history.after, history.boundary
    assert a.details.keys() == b.details.keys()
    archived = 0
    for message_id, detail in b.details.items():
        (expected,) = _as_archived([detail], edge)
        assert a.details[message_id] == expected
        archived += expected["archived"]
        assert sum(expected["counts"].values()) == expected["recipient_count"]
    assert archived > 0
    assert a.recipients == b.recipients
    assert a.delivered == b.delivered
    assert sum(len(r) for r in a.delivered.values()) > 0


def test_threads_read_the_same_but_for_archived(history: History) -> None:
    b, a, edge = history.before, history.after, history.boundary
    assert a.threads.keys() == b.threads.keys()
    for conversation_id, thread in b.threads.items():
        assert a.threads[conversation_id] == _as_archived(thread, edge)
    assert any(t["archived"] for thread in a.threads.values() for t in thread)
    assert any(
        t["direction"] == "outbound" and t["archived"] for th in a.threads.values() for t in th
    )
    for conversation_id, thread in a.small_threads.items():
        assert thread == a.threads[conversation_id]
        assert b.small_threads[conversation_id] == b.threads[conversation_id]


def test_the_archive_lists_its_months_with_their_counts(history: History) -> None:
    b, edge = history.before, history.boundary
    months = Counter(f"{_created(m):%Y-%m}" for m in b.everything if _created(m) < edge)
    recipients = Counter(
        f"{_created(m):%Y-%m}"
        for m in b.everything
        if _created(m) < edge
        for _ in b.recipients[m["id"]]
    )
    texts = Counter(
        f"{_created(t):%Y-%m}" for th in b.threads.values() for t in th if _created(t) < edge
    )
    listed = {row["month"]: row for row in history.after.archive}
    assert sorted(listed, reverse=True) == list(listed)  # newest first
    assert set(listed) == set(months) | set(texts)
    for month, row in listed.items():
        assert row["conversation_messages"] == texts[month]
        # Every text of the month is a message: broadcasts, plus the replies and answers
        # among the conversation messages (each has one recipient).
        assert row["messages"] >= months[month]
        assert row["recipients"] >= recipients[month]
        assert row["recipients"] - recipients[month] == row["messages"] - months[month]


def test_another_church_reads_nothing_archived(history: History) -> None:
    other = Church(f"http://127.0.0.1:{history.stack.http_port}")
    archived = next(m for m in history.after.everything if m["archived"])
    thread = next(c for c, th in history.after.threads.items() if any(t["archived"] for t in th))
    for path in (
        f"/v1/messages/{archived['id']}",
        f"/v1/messages/{archived['id']}/recipients",
        f"/v1/conversations/{thread}/messages",
    ):
        answer = other.api.get(path)
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["error"]["code"] == "not_found"
    assert other.api.get("/v1/archive").json()["data"] == []
    assert every_page(other.api, "/v1/messages", include_archived="true") == []


def test_include_archived_takes_true_or_false(history: History) -> None:
    explicit = every_page(history.api, "/v1/messages", include_archived="false")
    assert explicit == history.after.messages
    for bad in ("yes", "1", "TRUE", ""):
        answer = history.api.get("/v1/messages", params={"include_archived": bad})
        assert answer.status_code == 422, (bad, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "validation_error"
        assert error["details"][0]["field"] == "include_archived"


def test_a_store_outage_answers_503_and_the_live_months_still_answer(history: History) -> None:
    archived = next(m for m in history.after.everything if m["archived"])
    month = f"{_created(archived):%Y-%m}"
    store = stack_objects(history.stack)
    (key,) = [
        k
        for k in asyncio.run(store.list(f"archive/{history.church_id}/{month}/"))
        if k.split("/")[-1].startswith("message.")
    ]
    data = asyncio.run(store.get(key))
    asyncio.run(store.delete(key))
    try:
        answer = history.api.get(f"/v1/messages/{archived['id']}")
        if store.url.startswith("s3://"):
            # Nothing is cached on this stack: the read went to the store and failed.
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "unavailable"
            assert answer.headers["Retry-After"] == "2"
        else:
            # Read before: the web process answers from its cache, the store untouched.
            assert answer.status_code == 200, answer.text
            assert answer.json()["data"] == history.after.details[archived["id"]]
        live = next(m for m in history.after.everything if not m["archived"])
        assert history.api.get(f"/v1/messages/{live['id']}").status_code == 200
    finally:
        asyncio.run(store.put(key, data))
    answer = history.api.get(f"/v1/messages/{archived['id']}")
    assert answer.status_code == 200, answer.text


def test_an_erased_members_archived_text_is_blank(history: History) -> None:
    api = history.api
    # A conversation with text in an archived month (the demo's texts are never empty).
    conversation_id, thread = next(
        (c, th)
        for c, th in history.after.threads.items()
        if any(t["archived"] and t["body"] for t in th)
    )
    member_id = api.get(f"/v1/conversations/{conversation_id}").json()["data"]["member_id"]
    erased = api.delete(f"/v1/members/{member_id}")
    assert erased.status_code in (200, 204), erased.text
    assert api.get(f"/v1/members/{member_id}").status_code == 404
    now = every_page(api, f"/v1/conversations/{conversation_id}/messages")
    assert [t["id"] for t in now] == [t["id"] for t in thread]
    assert all(t["body"] == "" for t in now), now
    assert any(t["archived"] for t in now)
    # Nothing else changed: the other threads read as they did.
    other, other_thread = next(
        (c, th) for c, th in history.after.threads.items() if c != conversation_id
    )
    assert every_page(api, f"/v1/conversations/{other}/messages") == other_thread


# -- the per-process cache of archive files -------------------------------------------


class CountingStore:
    """A file:// store that counts gets and can be made to wait."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.gets = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def get(self, key: str) -> bytes:
        self.gets += 1
        await self.gate.wait()
        return await self.inner.get(key)


def _file(store: ObjectStore, name: str, recipients: int) -> IndexedFile:
    message_id = uuid.uuid4()
    rows = [
        ArchivedRecipient(
            church_id=uuid.UUID(int=1),
            message_id=message_id,
            id=uuid.UUID(int=n),
            created_at=datetime(2024, 1, 2, tzinfo=UTC),
            member_id=uuid.uuid4(),
            status="delivered",
            attempts=1,
            segments=1,
            updated_at=datetime(2024, 1, 2, tzinfo=UTC),
        )
        for n in range(1, recipients + 1)
    ]
    archived = write_month(rows, "message_recipient")
    key = f"archive/{uuid.UUID(int=1)}/2024-01/{name}.{archived.sha256[:16]}.ndjson.zst"
    asyncio.run(store.put(key, archived.data))
    return IndexedFile(
        church_id=uuid.UUID(int=1),
        month=datetime(2024, 1, 1).date(),
        table="message_recipient",
        object_key=key,
        schema_version=1,
        rows=recipients,
        bytes=len(archived.data),
        sha256=archived.sha256,
    )


@pytest.fixture
def files(tmp_path: Path) -> ObjectStore:
    return open_object_store(Settings.from_env({"KOINONIA_OBJECT_STORE_URL": tmp_path.as_uri()}))


def test_the_cache_keeps_recent_files_within_its_bytes(files: ObjectStore) -> None:
    a, b, c = (_file(files, name, 300) for name in ("a", "b", "c"))
    store = CountingStore(files)
    cache = FileCache(store, capacity=a.bytes + b.bytes + c.bytes - 1)  # type: ignore[arg-type]

    async def scenario() -> None:
        assert await cache.get(a) == await files.get(a.object_key)
        await cache.get(b)
        await cache.get(a)  # a is now the most recent: c pushes b out
        await cache.get(c)
        assert a.object_key in cache
        assert c.object_key in cache
        assert b.object_key not in cache
        assert cache.size == a.bytes + c.bytes
        assert store.gets == 3
        await cache.get(a)
        assert store.gets == 3
        await cache.get(b)
        assert store.gets == 4

    asyncio.run(scenario())


def test_concurrent_first_reads_share_one_fetch(files: ObjectStore) -> None:
    a = _file(files, "a", 50)
    store = CountingStore(files)
    cache = FileCache(store, capacity=1 << 20)  # type: ignore[arg-type]

    async def scenario() -> None:
        store.gate.clear()
        readers = [asyncio.create_task(cache.get(a)) for _ in range(10)]
        await asyncio.sleep(0.05)
        readers[0].cancel()  # one reader gives up: the others still get the file
        store.gate.set()
        results = await asyncio.gather(*readers[1:])
        assert store.gets == 1
        assert all(r == results[0] for r in results)

    asyncio.run(scenario())


def test_a_file_that_is_not_what_the_index_says_is_refused_and_not_kept(
    files: ObjectStore,
) -> None:
    a = _file(files, "a", 20)
    other = _file(files, "other", 21)
    cache = FileCache(files, capacity=1 << 20)

    async def scenario() -> None:
        # The object under a's key replaced by another file (a store gone wrong).
        await files.put(a.object_key, await files.get(other.object_key))
        for _ in range(2):
            with pytest.raises(VerificationFailed):
                await cache.get(a)
        assert a.object_key not in cache
        assert cache.size == 0

    asyncio.run(scenario())
