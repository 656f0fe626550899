"""The list pages served before the middleware stack (api/lean.py) answer as the full
stack does: CORS for allow-listed browsers, the error envelope, the headers."""

from __future__ import annotations

import httpx
import pytest

from api.routes import LEAN
from deploy.stack import Stack
from tests.conftest import Church

PATHS = sorted(path for _, path in LEAN)


@pytest.mark.parametrize("path", PATHS)
def test_cors_on_a_lean_route_is_the_full_stacks(
    church: Church, stack: Stack, base_url: str, path: str
) -> None:
    allowed = stack.env["KOINONIA_ALLOWED_ORIGINS"].split(",")[0]
    auth = {"Authorization": f"Bearer {church.key}"}
    lean = httpx.get(base_url + path, headers={"Origin": allowed, **auth})
    full = httpx.get(base_url + "/v1/groups", headers={"Origin": allowed, **auth})
    assert lean.status_code == full.status_code == 200
    cors = sorted(k for k in full.headers if k.startswith("access-control-"))
    assert cors
    assert sorted(k for k in lean.headers if k.startswith("access-control-")) == cors
    for name in cors:
        assert lean.headers[name] == full.headers[name]
    assert lean.headers["vary"] == full.headers["vary"]
    evil = {"Origin": "https://evil.example", **auth}
    lean = httpx.get(base_url + path, headers=evil)
    full = httpx.get(base_url + "/v1/groups", headers=evil)
    assert lean.status_code == 200
    assert "access-control-allow-origin" not in lean.headers
    for name in {*lean.headers, *full.headers}:
        if name.startswith("access-control-"):
            assert lean.headers.get(name) == full.headers.get(name), name
    plain = httpx.get(base_url + path, headers=auth)
    assert not [k for k in plain.headers if k.startswith("access-control-")]


@pytest.mark.parametrize("path", PATHS)
def test_a_lean_route_answers_with_the_same_headers_and_errors(
    church: Church, base_url: str, path: str
) -> None:
    auth = {"Authorization": f"Bearer {church.key}"}
    lean = httpx.get(base_url + path, headers={**auth, "X-Request-Id": "lean-1"})
    full = httpx.get(base_url + "/v1/groups", headers={**auth, "X-Request-Id": "full-1"})
    assert lean.headers["x-request-id"] == "lean-1"
    assert lean.json()["meta"]["request_id"] == "lean-1"
    for name in (
        "content-type",
        "x-content-type-options",
        "x-frame-options",
        "referrer-policy",
        "cross-origin-opener-policy",
        "ratelimit-limit",
        "ratelimit-policy",
    ):
        assert lean.headers[name] == full.headers[name], name
    unauthorized = httpx.get(base_url + path)
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["code"] == "unauthorized"
    invalid = httpx.get(base_url + path, params={"limit": "0"}, headers=auth)
    assert invalid.status_code == 422
    assert invalid.json()["error"]["details"][0]["field"] == "limit"
    bad_cursor = httpx.get(base_url + path, params={"cursor": "nonsense"}, headers=auth)
    assert bad_cursor.status_code == 422
    assert bad_cursor.json()["error"]["code"] == "validation_error"
    head = httpx.head(base_url + path, headers=auth)
    assert head.status_code == 200
