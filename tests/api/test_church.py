"""Church settings: ``GET /v1/church`` for everyone, ``PATCH /v1/church`` for admins."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from deploy.stack import Stack
from tests.api.staff_support import error_of, join
from tests.conftest import Church


def test_defaults(base_url: str) -> None:
    """A church as sign-up makes it (not the suite's fixture, which may adjust it)."""
    with httpx.Client(base_url=base_url, timeout=10.0) as browser:
        signup = browser.post(
            "/v1/auth/signup",
            json={
                "church_name": "Grace Chapel",
                "email": f"owner-{uuid.uuid4().hex[:10]}@example.org",
                "password": "correct horse battery",
            },
        )
        assert signup.status_code == 201, signup.text
        answer = browser.get("/v1/church")
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    church = signup.json()["data"]["church"]
    assert data["id"] == church["id"]
    assert data["phone_number"] == church["phone_number"]
    assert data["name"] == "Grace Chapel"
    assert data["timezone"] == "America/New_York"
    assert data["country"] == "US"
    assert data["plan"] == "starter"
    assert (data["quiet_hours_start"], data["quiet_hours_end"]) == ("08:00", "21:00")
    assert data["help_text"] == ""
    assert "Grace Chapel" in data["help_reply"]
    assert "Reply STOP to opt out" in data["help_reply"]
    assert data["opt_in_text"] == ""
    assert "Grace Chapel" in data["opt_in_reply"]
    assert data["opt_out_reply"] == "provider"


def test_admins_change_the_settings(church: Church) -> None:
    change = {
        "name": "Grace Chapel Downtown",
        "timezone": "America/Chicago",
        "country": "ca",
        "help_text": "Grace Chapel: 555-0100. Reply STOP to opt out.",
        "opt_in_text": "Welcome back to Grace Chapel texts!",
        "quiet_hours_start": "09:30",
        "quiet_hours_end": "20:00",
    }
    answer = church.session.patch("/v1/church", json=change)
    assert answer.status_code == 200, answer.text
    data = church.api.get("/v1/church").json()["data"]
    assert data == answer.json()["data"]
    assert data["name"] == "Grace Chapel Downtown"
    assert data["timezone"] == "America/Chicago"
    assert data["country"] == "CA"
    assert data["help_reply"] == change["help_text"]
    assert data["opt_in_reply"] == change["opt_in_text"]
    assert (data["quiet_hours_start"], data["quiet_hours_end"]) == ("09:30", "20:00")
    # The same church everywhere: /v1/me shows the new name.
    assert church.session.get("/v1/me").json()["data"]["church"]["name"] == change["name"]

    # Empty answers go back to the built-in texts; fields not given stay.
    back = church.api.patch("/v1/church", json={"help_text": "", "opt_in_text": ""})
    assert back.status_code == 200, back.text
    data = back.json()["data"]
    assert data["help_text"] == ""
    assert "Grace Chapel Downtown" in data["help_reply"]
    assert data["timezone"] == "America/Chicago"
    assert church.api.patch("/v1/church", json={}).json()["data"] == data

    entries = church.session.get("/v1/audit-log", params={"action": "church.update"}).json()
    newest = entries["data"][:3]
    assert [e["target_id"] for e in newest] == [church.id] * 3
    assert [sorted(e["details"]["changed"]) for e in newest] == [
        [],
        ["help_text", "opt_in_text"],
        sorted(change),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"timezone": "America/New_York "}, "timezone"),
        ({"timezone": "../../etc/passwd"}, "timezone"),
        ({"timezone": ""}, "timezone"),
        ({"quiet_hours_start": "8:00"}, "quiet_hours_start"),
        ({"quiet_hours_start": "24:00"}, "quiet_hours_start"),
        ({"quiet_hours_end": "21:60"}, "quiet_hours_end"),
        ({"quiet_hours_end": "21:00:00"}, "quiet_hours_end"),
        ({"country": "XX"}, "country"),
        ({"country": "USA"}, "country"),
        ({"help_text": "x" * 481}, "help_text"),
        ({"help_text": "nul\u0000"}, "help_text"),
        ({"opt_in_text": "x" * 481}, "opt_in_text"),
        ({"name": ""}, "name"),
        ({"plan": "pro"}, "plan"),
        ({"phone_number": "+15550000000"}, "phone_number"),
    ],
)
def test_bad_settings_are_refused(church: Church, body: dict[str, Any], field: str) -> None:
    before = church.api.get("/v1/church").json()["data"]
    answer = church.api.patch("/v1/church", json=body)
    assert error_of(answer) == (422, "validation_error"), answer.text
    assert answer.json()["error"]["details"][0]["field"] == field
    assert church.api.get("/v1/church").json()["data"] == before


def test_staff_read_but_do_not_change(church: Church, stack: Stack, base_url: str) -> None:
    staff, _ = join(church, stack, base_url, "staff")
    admin, _ = join(church, stack, base_url, "admin")
    try:
        assert staff.get("/v1/church").status_code == 200
        refused = staff.patch("/v1/church", json={"name": "Mine now"})
        assert error_of(refused) == (403, "forbidden")
        allowed = admin.patch("/v1/church", json={"quiet_hours_start": "07:00"})
        assert allowed.status_code == 200, allowed.text
        assert church.api.get("/v1/church").json()["data"]["name"] == "Grace Chapel"
    finally:
        staff.close()
        admin.close()


def test_read_only_keys_cannot_change_settings(church: Church) -> None:
    made = church.session.post("/v1/api-keys", json={"name": "ro", "scopes": ["read"]})
    key = made.json()["data"]["key"]
    headers = {"Authorization": f"Bearer {key}"}
    assert church.api.get("/v1/church", headers=headers).status_code == 200
    refused = church.api.patch("/v1/church", json={"name": "x"}, headers=headers)
    assert refused.status_code == 403


def test_each_church_changes_only_its_own(church: Church, other_church: Church) -> None:
    church.api.patch("/v1/church", json={"timezone": "Europe/Berlin"}).raise_for_status()
    assert other_church.api.get("/v1/church").json()["data"]["timezone"] == "America/New_York"
    other_church.api.patch("/v1/church", json={"name": "Hope Church"}).raise_for_status()
    assert church.api.get("/v1/church").json()["data"]["name"] == "Grace Chapel"
