"""Request limits (429 with Retry-After and RateLimit-*), CORS, and the audit log.

The limits run on a standalone Redis and on a Redis Cluster (``any_stack``,
tests/conftest.py), with the same assertions."""

from __future__ import annotations

import uuid

import anyio
import httpx
import psycopg
import pytest

from deploy.stack import Stack
from storage.process.settings import Settings
from storage.redis.connection import open_redis
from storage.redis.rate_limits import RateLimiter
from storage.redis.scripts import ScriptRunner
from tests.conftest import Church


def _signup(base_url: str) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=base_url, timeout=10.0)
    answer = client.post(
        "/v1/auth/signup",
        json={
            "church_name": "Limits",
            "email": f"limits-{uuid.uuid4().hex[:10]}@example.org",
            "password": "correct horse battery",
        },
    )
    assert answer.status_code == 201, answer.text
    client.headers["X-CSRF-Token"] = client.cookies["koinonia_csrf"]
    return client, answer.json()["data"]["church"]["id"]


def test_a_key_meets_its_own_limit_with_retry_after(any_church: Church, any_base_url: str) -> None:
    church, base_url = any_church, any_base_url
    made = church.session.post("/v1/api-keys", json={"name": "tight", "rate_limit_per_min": 3})
    assert made.status_code == 201, made.text
    assert made.json()["data"]["rate_limit_per_min"] == 3
    key = made.json()["data"]["key"]
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as client:
        remaining = []
        for _ in range(3):
            answer = client.get("/v1/conversations")
            assert answer.status_code == 200
            assert answer.headers["RateLimit-Limit"] == "3"
            remaining.append(int(answer.headers["RateLimit-Remaining"]))
        assert remaining == [2, 1, 0]
        refused = client.get("/v1/conversations")
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["RateLimit-Remaining"] == "0"
        assert "RateLimit-Reset" in refused.headers
    # The church's other key is not affected by this key's limit.
    assert church.api.get("/v1/conversations").status_code == 200


def test_a_church_meets_its_limit(any_stack: Stack, any_base_url: str) -> None:
    stack, base_url = any_stack, any_base_url
    client, church_id = _signup(base_url)
    # Before its first limited request (each process keeps a church's limit 30 s).
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("UPDATE church SET rate_limit_per_min = 5 WHERE id = %s", (church_id,))
    statuses = [client.get("/v1/me").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    refused = client.get("/v1/conversations")
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    client.close()


@pytest.mark.anyio
async def test_gcra_allows_the_limit_then_spaces_requests(any_stack: Stack) -> None:
    redis = open_redis(Settings.from_env(any_stack.env).redis)
    try:
        limiter = RateLimiter(ScriptRunner(redis))
        # One hash tag for this key and the two below: one script call takes both.
        key = f"kn:rl:{{test:{uuid.uuid4().hex}}}"
        verdicts = [await limiter.charge([(key, 100)]) for _ in range(101)]
        assert all(v.allowed for v in verdicts[:100])
        assert [v.remaining for v in verdicts[:3]] == [99, 98, 97]
        refused = verdicts[100]
        assert not refused.allowed
        assert refused.retry_after_s == 1  # one slot frees every 0.6 s
        # A refused request is not charged: after the interval one more passes.
        await anyio.sleep(0.65)
        assert (await limiter.charge([(key, 100)])).allowed
        # Two limits at once: refused by the tighter, and the looser is not charged.
        tight, loose = key + ":t", key + ":l"
        assert (await limiter.charge([(tight, 1), (loose, 10)])).allowed
        second = await limiter.charge([(tight, 1), (loose, 10)])
        assert not second.allowed
        assert second.limit == 1
        assert (await limiter.charge([(loose, 10)])).remaining == 8
    finally:
        await redis.aclose()


def test_cors_allows_only_listed_origins(stack: Stack, base_url: str) -> None:
    allowed = stack.env["KOINONIA_ALLOWED_ORIGINS"].split(",")[0]
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    ok = httpx.options(base_url + "/v1/groups", headers={"Origin": allowed, **preflight})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == allowed
    assert ok.headers["access-control-allow-credentials"] == "true"
    evil = httpx.options(
        base_url + "/v1/groups", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in evil.headers
    simple = httpx.get(base_url + "/health/live", headers={"Origin": allowed})
    assert simple.headers["access-control-allow-origin"] == allowed
    assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()


def test_writes_are_audited_with_actor_and_target(church: Church) -> None:
    made = church.session.post("/v1/api-keys", json={"name": "audited"})
    key_id = made.json()["data"]["id"]
    church.session.post(f"/v1/api-keys/{key_id}/rotate")
    entries = church.session.get("/v1/audit-log", params={"action": "api_key.*"}).json()["data"]
    by_action = {e["action"]: e for e in entries if e["target_id"] == key_id}
    assert set(by_action) == {"api_key.create", "api_key.rotate"}
    created = by_action["api_key.create"]
    assert created["actor_type"] == "user"
    assert created["actor_id"] == church.user_id
    assert created["details"] == {"name": "audited", "scopes": ["read", "write"]}
    assert created["request_id"]
    # Reads are not audited; secrets never are.
    assert all("key" not in e["details"] for e in entries)
    # An API-key write names the key as the actor.
    group = church.api.post("/v1/groups", json={"name": "Audited"}).json()["data"]["id"]
    made_by_key = church.session.get("/v1/audit-log", params={"action": "group.create"})
    entry = next(e for e in made_by_key.json()["data"] if e["target_id"] == group)
    assert entry["actor_type"] == "api_key"
    bad = church.session.get("/v1/audit-log", params={"actor_id": "nope"})
    assert bad.status_code == 422


def test_rotated_key_stops_working_at_once(church: Church, base_url: str) -> None:
    made = church.session.post("/v1/api-keys", json={"name": "rotating", "scopes": ["read"]})
    old = made.json()["data"]
    with httpx.Client(base_url=base_url) as client:
        bearer = {"Authorization": f"Bearer {old['key']}"}
        assert client.get("/v1/conversations", headers=bearer).status_code == 200  # now cached
        rotated = church.session.post(f"/v1/api-keys/{old['id']}/rotate")
        assert rotated.status_code == 200
        new = rotated.json()["data"]
        assert new["id"] == old["id"]
        assert new["scopes"] == ["read"]
        assert new["key"] != old["key"]
        assert client.get("/v1/conversations", headers=bearer).status_code == 401
        fresh = {"Authorization": f"Bearer {new['key']}"}
        assert client.get("/v1/conversations", headers=fresh).status_code == 200
        assert church.session.delete(f"/v1/api-keys/{old['id']}").status_code == 200
        assert client.get("/v1/conversations", headers=fresh).status_code == 401
        assert church.session.post(f"/v1/api-keys/{old['id']}/rotate").status_code == 404
    # API keys cannot manage keys.
    assert church.api.get("/v1/api-keys").status_code == 403
