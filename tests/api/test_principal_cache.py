"""Principals cached in web processes (storage/process/principal_cache.py).

A revoked API key, an ended session, a removed user and a changed role apply to the
very next request on the process that made the change, and on other web processes
as soon as the revocation message reaches them; a credential ended behind the
cache's back (no message) stops working when its entry expires, or when the hub's
pub/sub connection comes back (revocations sent meanwhile were never heard).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from deploy.stack import Stack, free_ports
from realtime.revocation import Revocations
from storage.pg.credentials import Principal
from storage.process.principal_cache import PrincipalCache, api_key_entry
from storage.redis import key_names
from tests.api.staff_support import join, login, sql
from tests.conftest import Church, stack_redis, wait_until

LONG_CACHE_S = 60
"""Node B keeps principals this long: only revocations or a reconnection drop them."""
SESSION_S = 4
"""Sessions made through node B live this long."""
DEFAULT_CACHE_S = 5.0
"""KOINONIA_PRINCIPAL_CACHE_S's default, which the session stack (node A) runs with."""


@pytest.fixture(scope="module")
def node_b(stack: Stack) -> Iterator[str]:
    (port,) = free_ports(1)
    env = dict(stack.env)
    env["KOINONIA_HTTP_PORT"] = str(port)
    env["KOINONIA_PRINCIPAL_CACHE_S"] = str(LONG_CACHE_S)
    env["KOINONIA_SESSION_TTL_S"] = str(SESSION_S)
    stack.spawn("web_principals", "web", env=env)
    stack.wait_ready(f"http://127.0.0.1:{port}/health/ready")
    yield f"http://127.0.0.1:{port}"
    stack.stop_process("web_principals")


def new_key(church: Church) -> tuple[str, str]:
    """(id, secret) of a fresh API key of ``church``."""
    made = church.session.post("/v1/api-keys", json={"name": f"k-{uuid.uuid4().hex[:6]}"})
    assert made.status_code == 201, made.text
    data = made.json()["data"]
    return data["id"], data["key"]


def page(base: str, key: str) -> int:
    answer = httpx.get(
        base + "/v1/conversations", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    return answer.status_code


def end_key_silently(stack: Stack, key_id: str, secret: str) -> None:
    """Revoke a key in Postgres and drop its Redis entry without publishing the
    revocation: only a process's own cache still knows the key."""
    sql(stack, "UPDATE api_key SET revoked_at = now() WHERE id = %s", (key_id,))
    sql(stack, "DELETE FROM api_key_lookup WHERE api_key_id = %s", (key_id,))
    digest = hashlib.sha256(secret.encode()).hexdigest()
    with stack_redis(stack) as client:
        client.delete(key_names.api_key_auth(digest))


def test_a_revoked_key_is_refused_on_the_next_request(
    church: Church, base_url: str, node_b: str
) -> None:
    key_id, secret = new_key(church)
    for base in (base_url, node_b):
        assert page(base, secret) == 200
        assert page(base, secret) == 200  # now from the process's cache
    assert church.session.delete(f"/v1/api-keys/{key_id}").status_code == 200
    # The process that revoked it: at once. Another process: once its hub hears it.
    assert page(base_url, secret) == 401
    wait_until(lambda: page(node_b, secret) == 401, 5.0, "node B refuses the revoked key")


def test_a_rotated_key_is_refused_and_its_new_secret_accepted(
    church: Church, base_url: str
) -> None:
    key_id, secret = new_key(church)
    assert page(base_url, secret) == 200
    rotated = church.session.post(f"/v1/api-keys/{key_id}/rotate")
    assert rotated.status_code == 200, rotated.text
    assert page(base_url, secret) == 401
    assert page(base_url, rotated.json()["data"]["key"]) == 200


def test_an_ended_session_is_refused_on_the_next_request(church: Church, base_url: str) -> None:
    client = login(base_url, church.email, "correct horse battery")
    cookie = client.cookies["koinonia_session"]
    other = httpx.Client(base_url=base_url, cookies={"koinonia_session": cookie}, timeout=10)
    assert other.get("/v1/conversations").status_code == 200
    assert other.get("/v1/conversations").status_code == 200
    client.headers["X-CSRF-Token"] = client.cookies["koinonia_csrf"]
    assert client.post("/v1/auth/logout").status_code == 200
    assert other.get("/v1/conversations").status_code == 401


def test_a_removed_user_and_a_changed_role_apply_to_the_next_request(
    church: Church, stack: Stack, base_url: str
) -> None:
    admin, user = join(church, stack, base_url, "admin")
    # Admin-only (role ``admin``): the audit log.
    assert admin.get("/v1/audit-log").status_code == 200
    assert admin.get("/v1/audit-log").status_code == 200
    changed = church.session.patch(f"/v1/staff/{user['id']}", json={"role": "staff"})
    assert changed.status_code == 200, changed.text
    assert admin.get("/v1/audit-log").status_code == 403
    assert admin.get("/v1/conversations").status_code == 200
    assert church.session.delete(f"/v1/staff/{user['id']}").status_code == 200
    assert admin.get("/v1/conversations").status_code == 401


def test_an_entry_expires_after_its_ttl(church: Church, stack: Stack, base_url: str) -> None:
    key_id, secret = new_key(church)
    assert page(base_url, secret) == 200
    filled = time.monotonic()
    end_key_silently(stack, key_id, secret)
    # Still known to this process's cache (and only there): the cache is in use.
    assert page(base_url, secret) == 200
    wait_until(lambda: page(base_url, secret) == 401, DEFAULT_CACHE_S + 3, "the entry expires")
    assert time.monotonic() - filled >= DEFAULT_CACHE_S - 0.5


def test_a_session_entry_ends_with_the_session(church: Church, node_b: str) -> None:
    client = login(node_b, church.email, "correct horse battery")
    made = time.monotonic()
    assert client.get("/v1/conversations").status_code == 200
    wait_until(
        lambda: client.get("/v1/conversations").status_code == 401,
        SESSION_S + 3,
        "the session's end",
    )
    # Long before node B's cache would have let it go.
    assert time.monotonic() - made < LONG_CACHE_S / 2


def test_the_cache_is_emptied_when_pub_sub_reconnects(
    church: Church, stack: Stack, node_b: str
) -> None:
    key_id, secret = new_key(church)
    assert page(node_b, secret) == 200
    end_key_silently(stack, key_id, secret)
    assert page(node_b, secret) == 200  # cached on node B, which heard nothing
    started = time.monotonic()
    with stack_redis(stack) as client:
        client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    wait_until(lambda: page(node_b, secret) == 401, 10.0, "node B forgets after reconnecting")
    assert time.monotonic() - started < LONG_CACHE_S / 2


# -- the cache alone (no I/O) ---------------------------------------------------

CHURCH = uuid.uuid4()


def key_principal(key_id: uuid.UUID) -> Principal:
    return Principal(
        church_id=CHURCH, kind="api_key", scopes=frozenset({"read"}), api_key_id=key_id
    )


def session_principal(user: uuid.UUID, token_hash: str) -> Principal:
    return Principal(
        church_id=CHURCH,
        kind="session",
        scopes=frozenset({"read", "write"}),
        user_id=user,
        role="admin",
        session_hash=token_hash,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def listening_cache(clock: Clock, **kw: float) -> PrincipalCache:
    cache = PrincipalCache(ttl_s=5.0, clock=clock, **kw)  # type: ignore[arg-type]
    Revocations().listeners.append(cache)
    return cache


def test_nothing_is_kept_until_revocations_reach_the_cache() -> None:
    cache = PrincipalCache()
    key = api_key_entry(b"d" * 32)
    cache.put(key, key_principal(uuid.uuid4()), cache.generation)
    assert cache.get(key) is None
    Revocations().listeners.append(cache)
    cache.put(key, key_principal(uuid.uuid4()), cache.generation)
    assert cache.get(key) is not None


def test_messages_drop_exactly_what_they_name() -> None:
    clock = Clock()
    cache = listening_cache(clock)
    k1, k2 = uuid.uuid4(), uuid.uuid4()
    u1, u2 = uuid.uuid4(), uuid.uuid4()
    entries = {
        b"k1": key_principal(k1),
        b"k2": key_principal(k2),
        b"s1": session_principal(u1, "h1"),
        b"s1b": session_principal(u1, "h1b"),
        b"s2": session_principal(u2, "h2"),
    }
    for key, principal in entries.items():
        cache.put(key, principal, cache.generation)
    cache.forget(f"api_key {k1}")
    assert cache.get(b"k1") is None
    assert cache.get(b"k2") is not None
    cache.forget("session h1b")
    assert cache.get(b"s1b") is None
    assert cache.get(b"s1") is not None
    cache.forget(f"role {CHURCH} {u1}")
    assert cache.get(b"s1") is None
    assert cache.get(b"s2") is not None
    cache.put(b"s1", entries[b"s1"], cache.generation)
    cache.forget(f"user {CHURCH} {u1}".encode())
    assert cache.get(b"s1") is None
    assert cache.get(b"s2") is not None
    cache.forget_all()
    assert len(cache) == 0


def test_ttl_size_and_races() -> None:
    clock = Clock()
    cache = listening_cache(clock, size=2)
    principal = key_principal(uuid.uuid4())
    cache.put(b"a", principal, cache.generation)
    clock.now += 4.9
    assert cache.get(b"a") is principal
    clock.now += 0.2
    assert cache.get(b"a") is None
    # A session's entry never outlives the session.
    cache.put(b"s", session_principal(uuid.uuid4(), "h"), cache.generation, at_most_s=1.0)
    clock.now += 1.1
    assert cache.get(b"s") is None
    # Bounded: the oldest entry leaves first.
    for name in (b"x", b"y", b"z"):
        cache.put(name, key_principal(uuid.uuid4()), cache.generation)
    assert cache.get(b"x") is None
    assert cache.get(b"z") is not None
    assert len(cache) == 2
    # A lookup that began before a revocation arrived stores nothing.
    before = cache.generation
    cache.forget(f"api_key {uuid.uuid4()}")
    cache.put(b"late", principal, before)
    assert cache.get(b"late") is None
