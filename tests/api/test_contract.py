"""Tests that walk every operation of the registry: tenancy, credentials, the
OpenAPI document and its explorer.

They read the same list the app routes from (``api.routes.operations``), so a new
route is covered the moment it exists, and a route these tests cannot exercise
fails with a message saying what to add.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api.operation import Operation
from api.routes import operations
from deploy.stack import Stack
from tests.api.staff_support import join
from tests.api.test_dead_letters import plant_dead_letter
from tests.conftest import Church, unique_phone

SOMEONE_ELSES = "00000000-0000-7000-8000-000000000000"


def _path_with(op: Operation, ids: dict[str, str]) -> str:
    """The op's path with each ``{param}`` filled by the id of the resource it names."""
    parts = op.path.split("/")
    out = []
    for i, part in enumerate(parts):
        if part.startswith("{"):
            resource = parts[i - 1]
            name = part[1:-1]
            key = resource if name == "id" else name
            if i == _first_param(parts) and key not in ids:
                pytest.fail(
                    f"{op.method} {op.path}: the tenancy matrix has no '{key}' of the other "
                    "church; create one in the other_resources fixture"
                )
            out.append(ids.get(key, SOMEONE_ELSES))
        else:
            out.append(part)
    return "/".join(out)


def _first_param(parts: list[str]) -> int:
    return next(i for i, p in enumerate(parts) if p.startswith("{"))


def _body(op: Operation) -> Any:
    if op.body is None:
        return None
    if not op.examples:
        pytest.fail(f"{op.method} {op.path} has a body but no example; add one (/docs shows it)")
    return next(iter(op.examples.values()))


@pytest.fixture(scope="module")
def other_resources(
    base_url: str, sim_url: str, stack: Stack
) -> Iterator[tuple[Church, dict[str, str]]]:
    """Church B and one resource of every kind that has an id in a path."""
    b = Church(base_url)
    group = b.group("B's group")
    phone = unique_phone()
    member = b.member(phone, [group])
    message = b.broadcast(group, "B's message")
    ids: dict[str, str] = {"groups": group, "members": member, "member_id": member}
    ids["messages"] = message
    ids["api-keys"] = b.session.get("/v1/api-keys").json()["data"][0]["id"]
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
    ids["media"] = b.api.post("/v1/media", files={"file": ("a.png", png)}).json()["data"]["id"]
    ids["staff"] = b.user_id
    ids["webhook-endpoints"] = b.api.post(
        "/v1/webhook-endpoints", json={"url": "https://b.example/hook", "events": ["*"]}
    ).json()["data"]["id"]
    for path, key, body in (
        ("/v1/branches", "branches", {"name": "B's branch"}),
        ("/v1/templates", "templates", {"name": "B's template", "body": "Hi {{first_name}}"}),
        (
            "/v1/canned-replies",
            "canned-replies",
            {"name": "B's reply", "body": "Hi {{first_name}}"},
        ),
        (
            "/v1/keywords",
            "keywords",
            {"keyword": "BJOIN", "group_id": group, "reply": "B's welcome"},
        ),
        (
            "/v1/recurring-messages",
            "recurring-messages",
            {
                "name": "B weekly",
                "body": "Service at 10",
                "target": {"group_ids": [group]},
                "rule": {"frequency": "weekly", "time": "09:00", "weekdays": [6]},
            },
        ),
        (
            "/v1/invitations",
            "invitations",
            {"email": f"b-{uuid.uuid4().hex[:8]}@example.org", "role": "staff"},
        ),
    ):
        client = b.session if key == "invitations" else b.api
        answer = client.post(path, json=body)
        if answer.status_code in (200, 201):
            ids[key] = answer.json()["data"]["id"]
    # A conversation: B's member writes in.
    inbound = {"from": phone, "to": b.phone_number, "text": "Hello from B"}
    assert httpx.post(sim_url + "/_sim/inbound", json=inbound).status_code < 300
    ids["conversations"] = b.conversations_when(1)[0]["id"]
    ids["dead-letters"] = plant_dead_letter(stack, b.id)
    yield b, ids
    b.close()


def _credentials(church: Church, op: Operation) -> httpx.Client:
    return church.session if op.session_only else church.api


@pytest.mark.parametrize("op", [o for o in operations() if o.path_params], ids=lambda o: o.name)
def test_another_churchs_ids_are_not_found(
    op: Operation, church: Church, other_resources: tuple[Church, dict[str, str]]
) -> None:
    _, ids = other_resources
    if op.scope is None:
        pytest.fail(f"{op.name} takes an id but no credentials: who may see that row?")
    path = _path_with(op, ids)
    client = _credentials(church, op)
    answer = client.request(op.method, path, json=_body(op))
    assert answer.status_code == 404, f"{op.method} {path}: {answer.status_code} {answer.text}"
    assert answer.json()["error"]["code"] == "not_found"
    for value in ids.values():
        assert value not in answer.text


@pytest.mark.parametrize(
    "op", [o for o in operations() if o.scope is not None], ids=lambda o: o.name
)
def test_every_protected_route_needs_credentials(op: Operation, base_url: str) -> None:
    path = re.sub(r"\{[^}]+\}", SOMEONE_ELSES, op.path)
    for headers in ({}, {"Authorization": "Bearer kn_nope_nope"}, {"Authorization": "Basic x"}):
        answer = httpx.request(op.method, base_url + path, headers=headers, json=_body(op))
        assert answer.status_code == 401, f"{op.method} {path} {headers}: {answer.text}"
        assert answer.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    "op",
    # Session-only writes refuse every key, read-only or not (the next test).
    [o for o in operations() if o.scope == "write" and not o.session_only],
    ids=lambda o: o.name,
)
def test_read_only_keys_cannot_write(op: Operation, church: Church, base_url: str) -> None:
    made = church.session.post("/v1/api-keys", json={"name": "ro", "scopes": ["read"]})
    key = made.json()["data"]["key"]
    path = re.sub(r"\{[^}]+\}", SOMEONE_ELSES, op.path)
    answer = httpx.request(
        op.method, base_url + path, headers={"Authorization": f"Bearer {key}"}, json=_body(op)
    )
    assert answer.status_code == 403, f"{op.method} {path}: {answer.text}"


@pytest.mark.parametrize("op", [o for o in operations() if o.session_only], ids=lambda o: o.name)
def test_session_only_routes_refuse_api_keys(op: Operation, church: Church) -> None:
    path = re.sub(r"\{[^}]+\}", SOMEONE_ELSES, op.path)
    answer = church.api.request(op.method, path, json=_body(op))
    assert answer.status_code == 403, f"{op.method} {path}: {answer.text}"


def test_openapi_lists_every_operation_with_its_permissions(base_url: str) -> None:
    doc = httpx.get(base_url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    for op in operations():
        entry = doc["paths"][op.path][op.method.lower()]
        assert entry["operationId"] == op.name
        if op.scope is not None:
            assert entry["x-required-role"] == op.role
            assert entry["x-required-scope"] == op.scope
        if op.body is not None:
            assert entry["requestBody"]["content"][op.body_media_type]["schema"]
    names = [op.name for op in operations()]
    assert len(names) == len(set(names)), "operation names (audit actions) must be unique"


def test_docs_work_without_internet(base_url: str) -> None:
    page = httpx.get(base_url + "/docs")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources, page.text
    for source in sources:
        assert source.startswith("/"), f"/docs must not load {source} from elsewhere"
        asset = httpx.get(base_url + source)
        assert asset.status_code == 200, source
        assert len(asset.content) > 0
    explorer = httpx.get(base_url + "/docs/explorer.js").text
    assert "/openapi.json" in explorer
    assert "http" not in explorer.replace("/openapi.json", "")


@pytest.fixture(scope="module")
def staff_and_admin(
    base_url: str, stack: Stack
) -> Iterator[tuple[Church, httpx.Client, httpx.Client]]:
    """A church with a signed-in ``staff`` user and a signed-in ``admin``."""
    owner = Church(base_url)
    staff, _ = join(owner, stack, base_url, "staff")
    admin, _ = join(owner, stack, base_url, "admin")
    yield owner, staff, admin
    for client in (staff, admin):
        client.close()
    owner.close()


@pytest.mark.parametrize(
    "op",
    [o for o in operations() if o.scope is not None and o.role != "staff"],
    ids=lambda o: o.name,
)
def test_roles_below_the_least_role_are_forbidden(
    op: Operation, staff_and_admin: tuple[Church, httpx.Client, httpx.Client]
) -> None:
    """The role is checked before the row is looked up: a staff user learns nothing
    about ids on an admin route, and an admin nothing on an owner route."""
    _, staff, admin = staff_and_admin
    path = re.sub(r"\{[^}]+\}", SOMEONE_ELSES, op.path)
    below = [staff] if op.role == "admin" else [staff, admin]
    for client in below:
        answer = client.request(op.method, path, json=_body(op))
        assert answer.status_code == 403, f"{op.method} {path}: {answer.text}"
        assert answer.json()["error"]["code"] == "forbidden"


def test_cache_hits_and_misses_are_reported(church: Church, base_url: str) -> None:
    """Group counts are cache-aside: the second read is a hit, a membership change
    invalidates, and /health/detailed counts both (this process's counters)."""

    def stats() -> dict[str, Any]:
        # An API key acts as an admin, who may read it.
        cache: dict[str, Any] = church.api.get("/health/detailed").json()["data"]["checks"]["cache"]
        return cache

    group = church.group("Cached")
    before = stats()
    church.api.get(f"/v1/groups/{group}")
    church.api.get(f"/v1/groups/{group}")
    after = stats()
    assert after["hits"] >= before["hits"] + 1
    assert after["misses"] >= before["misses"] + 1
    church.member(unique_phone(), [group])
    shown = church.api.get(f"/v1/groups/{group}").json()["data"]
    assert shown["member_count"] == 1
