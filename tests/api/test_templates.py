"""Message templates against the running stack: merge fields checked on save,
segments and encoding, names unique per church, tenancy."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx

from tests.conftest import Church


def _data(answer: httpx.Response, status: int = 200) -> Any:
    assert answer.status_code == status, answer.text
    return answer.json()["data"]


def _details(answer: httpx.Response) -> list[dict[str, str]]:
    assert answer.status_code == 422, answer.text
    body = answer.json()["error"]
    assert body["code"] == "validation_error"
    details: list[dict[str, str]] = body["details"]
    return details


def test_template_crud_with_merge_fields_and_segments(church: Church) -> None:
    made = _data(
        church.api.post(
            "/v1/templates",
            json={"name": "Welcome", "body": "Hi {{ first_name }}, welcome to {{church_name}}!"},
        ),
        201,
    )
    assert made["name"] == "Welcome"
    assert made["merge_fields"] == ["church_name", "first_name"]
    assert (made["segments"], made["encoding"]) == (1, "GSM-7")
    assert _data(church.api.get(f"/v1/templates/{made['id']}")) == made

    long_body = "Hello {{full_name}} " + "x" * 200
    changed = _data(church.api.patch(f"/v1/templates/{made['id']}", json={"body": long_body}))
    assert changed["name"] == "Welcome"
    assert changed["merge_fields"] == ["full_name"]
    assert changed["segments"] == 2
    assert datetime.fromisoformat(changed["updated_at"]) >= datetime.fromisoformat(
        made["updated_at"]
    )
    emoji = _data(
        church.api.post("/v1/templates", json={"name": "Party", "body": "🎉 Party!"}), 201
    )
    assert (emoji["encoding"], emoji["segments"]) == ("UCS-2", 1)
    assert emoji["merge_fields"] == []

    page = church.api.get("/v1/templates", params={"limit": 1}).json()
    rest = church.api.get("/v1/templates", params={"cursor": page["meta"]["next_cursor"]}).json()
    assert [t["id"] for t in page["data"] + rest["data"]] == [made["id"], emoji["id"]]
    assert rest["meta"]["next_cursor"] is None

    deleted = _data(church.api.delete(f"/v1/templates/{made['id']}"))
    assert deleted == {"id": made["id"], "deleted": True}
    assert church.api.get(f"/v1/templates/{made['id']}").status_code == 404
    assert church.api.delete(f"/v1/templates/{made['id']}").status_code == 404


def test_merge_fields_are_validated_on_save(church: Church) -> None:
    unknown = _details(
        church.api.post("/v1/templates", json={"name": "T", "body": "Hi {{nickname}}"})
    )
    assert unknown[0]["field"] == "body"
    assert "{{nickname}}" in unknown[0]["message"]
    assert "{{first_name}}" in unknown[0]["message"]  # names the known ones too
    malformed = _details(
        church.api.post("/v1/templates", json={"name": "T", "body": "Hi {{first_name"})
    )
    assert malformed[0]["field"] == "body"
    assert "{{" in malformed[0]["message"]
    both = _details(
        church.api.post("/v1/templates", json={"name": "T", "body": "{{nope}} and {{ x"})
    )
    assert [d["field"] for d in both] == ["body", "body"]
    assert _details(church.api.post("/v1/templates", json={"name": "T"}))[0] == {
        "field": "body",
        "message": "is required",
    }
    assert (
        _details(church.api.post("/v1/templates", json={"name": "", "body": "x"}))[0]["field"]
        == "name"
    )
    assert (
        _details(church.api.post("/v1/templates", json={"name": " ", "body": "x"}))[0]["field"]
        == "name"
    )
    assert (
        _details(church.api.post("/v1/templates", json={"name": "T", "body": "x" * 1601}))[0][
            "field"
        ]
        == "body"
    )

    good = _data(church.api.post("/v1/templates", json={"name": "T", "body": "Hi"}), 201)
    bad_patch = _details(
        church.api.patch(f"/v1/templates/{good['id']}", json={"body": "{{last_nam}}"})
    )
    assert bad_patch[0]["field"] == "body"
    assert "last_nam" in bad_patch[0]["message"]
    assert _data(church.api.get(f"/v1/templates/{good['id']}"))["body"] == "Hi"
    assert church.api.get("/v1/templates").json()["data"] == [good]


def test_template_names_are_unique_per_church(church: Church, other_church: Church) -> None:
    first = _data(church.api.post("/v1/templates", json={"name": "Weekly", "body": "A"}), 201)
    taken = church.api.post("/v1/templates", json={"name": "weekly", "body": "B"})
    assert taken.status_code == 409
    assert taken.json()["error"]["details"][0]["field"] == "name"
    second = _data(church.api.post("/v1/templates", json={"name": "Daily", "body": "C"}), 201)
    clash = church.api.patch(f"/v1/templates/{second['id']}", json={"name": "WEEKLY"})
    assert clash.status_code == 409
    # Another church may use the same name, and cannot see or touch this one.
    _data(other_church.api.post("/v1/templates", json={"name": "Weekly", "body": "D"}), 201)
    for method in ("GET", "PATCH", "DELETE"):
        answer = other_church.api.request(
            method,
            f"/v1/templates/{first['id']}",
            json={"name": "x"} if method == "PATCH" else None,
        )
        assert answer.status_code == 404
    assert _data(church.api.get(f"/v1/templates/{first['id']}"))["body"] == "A"
    assert {t["name"] for t in _data(other_church.api.get("/v1/templates"))} == {"Weekly"}
