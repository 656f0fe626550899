"""Staff users, roles and invitations over REST, against the real stack."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from api.routes import operations
from deploy.stack import Stack
from storage.pg.staff import invitation_refusal, removal_refusal, role_change_refusal
from tests.api.staff_support import (
    accept,
    browser,
    error_of,
    invite,
    join,
    login,
    new_email,
    outbox_mail,
    sql,
    token_in,
)
from tests.conftest import Church


def test_invitation_end_to_end(church: Church, stack: Stack, base_url: str) -> None:
    email = new_email("admin")
    answer = church.session.post("/v1/invitations", json={"email": email, "role": "admin"})
    assert answer.status_code == 201, answer.text
    invitation = answer.json()["data"]
    assert invitation["email"] == email
    assert invitation["role"] == "admin"
    assert invitation["status"] == "pending"
    assert invitation["invited_by"] == church.user_id
    assert invitation["mail_status"] == "stored"
    assert "token" not in invitation

    pending = church.session.get("/v1/invitations").json()["data"]
    assert [i["id"] for i in pending] == [invitation["id"]]

    subject, body, status, _ = outbox_mail(stack, email, "invitation")
    assert status == "stored"
    assert "Grace Chapel" in subject
    token = token_in(body, "accept-invitation", base_url)
    # Only the digest is stored.
    stored = sql(
        stack, "SELECT token_hash FROM staff_invitation WHERE id = %s", (invitation["id"],)
    )
    assert bytes(stored[0][0]) != token.encode()
    assert len(bytes(stored[0][0])) == 32

    admin, data = accept(base_url, token, name="Ruth Secretary")
    assert data["church"]["id"] == church.id
    assert data["user"]["email"] == email
    assert data["user"]["role"] == "admin"
    me = admin.get("/v1/me").json()["data"]
    assert me["user"]["id"] == data["user"]["id"]
    assert me["church"]["id"] == church.id

    # The new admin's session works, and admins may invite staff.
    assert admin.get("/v1/invitations").status_code == 200
    staff_invite = admin.post("/v1/invitations", json={"email": new_email(), "role": "staff"})
    assert staff_invite.status_code == 201, staff_invite.text

    staff = church.session.get("/v1/staff").json()["data"]
    by_id = {s["id"]: s for s in staff}
    assert by_id[data["user"]["id"]]["name"] == "Ruth Secretary"
    assert by_id[church.user_id]["role"] == "owner"
    assert church.session.get("/v1/invitations").json()["data"][0]["id"] != invitation["id"]

    # Single use.
    again = browser(base_url).post(
        "/v1/invitations/accept", json={"token": token, "password": "another good password"}
    )
    assert error_of(again) == (422, "validation_error")
    assert again.json()["error"]["details"] == [
        {"field": "token", "message": "this invitation is unknown, used, revoked or expired"}
    ]
    admin.close()


def test_staff_role_cannot_manage_people(church: Church, stack: Stack, base_url: str) -> None:
    staff, user = join(church, stack, base_url, "staff")
    assert user["role"] == "staff"
    assert staff.get("/v1/staff").status_code == 200
    assert staff.get(f"/v1/staff/{church.user_id}").status_code == 200
    for answer in (
        staff.post("/v1/invitations", json={"email": new_email(), "role": "staff"}),
        staff.patch(f"/v1/staff/{church.user_id}", json={"role": "staff"}),
        staff.patch(f"/v1/staff/{user['id']}", json={"role": "admin"}),
        staff.delete(f"/v1/staff/{church.user_id}"),
        staff.get("/v1/invitations"),
    ):
        assert error_of(answer) == (403, "forbidden"), answer.text
    staff.close()


def test_role_change_reaches_live_sessions(church: Church, stack: Stack, base_url: str) -> None:
    staff, user = join(church, stack, base_url, "staff")
    second = login(base_url, user["email"])
    for client in (staff, second):
        assert client.get("/v1/invitations").status_code == 403

    promoted = church.session.patch(f"/v1/staff/{user['id']}", json={"role": "admin"})
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["data"]["role"] == "admin"
    for client in (staff, second):
        assert client.get("/v1/invitations").status_code == 200
        assert client.get("/v1/me").json()["data"]["user"]["role"] == "admin"

    demoted = church.session.patch(f"/v1/staff/{user['id']}", json={"role": "staff"})
    assert demoted.status_code == 200, demoted.text
    for client in (staff, second):
        assert client.get("/v1/invitations").status_code == 403

    audit = sql(
        stack,
        "SELECT details FROM audit_log WHERE church_id = %s AND action = 'staff.update' "
        "ORDER BY id",
        (church.id,),
    )
    assert [a[0] for a in audit] == [
        {"role": "admin", "previous_role": "staff"},
        {"role": "staff", "previous_role": "admin"},
    ]
    staff.close()
    second.close()


def test_last_owner_rules(church: Church, stack: Stack, base_url: str) -> None:
    me = church.user_id
    answer = church.session.patch(f"/v1/staff/{me}", json={"role": "admin"})
    assert error_of(answer) == (409, "conflict")
    assert error_of(church.session.delete(f"/v1/staff/{me}")) == (409, "conflict")

    owner2, user2 = join(church, stack, base_url, "owner")
    assert user2["role"] == "owner"
    # With two owners, the first may step down; then the second is the last.
    assert church.session.patch(f"/v1/staff/{me}", json={"role": "admin"}).status_code == 200
    answer = owner2.patch(f"/v1/staff/{user2['id']}", json={"role": "staff"})
    assert error_of(answer) == (409, "conflict")
    assert answer.json()["error"]["details"][0]["field"] == "role"
    # The former owner, now an admin, can no longer touch the owner.
    assert error_of(church.session.delete(f"/v1/staff/{user2['id']}")) == (403, "forbidden")
    assert owner2.patch(f"/v1/staff/{me}", json={"role": "owner"}).status_code == 200
    assert owner2.delete(f"/v1/staff/{me}").status_code == 200
    assert owner2.get("/v1/staff").json()["data"] == [
        owner2.get(f"/v1/staff/{user2['id']}").json()["data"]
    ]
    # The removed owner's session ended with the removal.
    assert error_of(church.session.get("/v1/me")) == (401, "unauthorized")
    owner2.close()


def test_what_admins_may_do(church: Church, stack: Stack, base_url: str) -> None:
    admin, admin_user = join(church, stack, base_url, "admin")
    other_admin, other_admin_user = join(church, stack, base_url, "admin")
    staff, staff_user = join(church, stack, base_url, "staff")

    # Owners only: inviting or granting owner, changing or removing admins and owners.
    invite_owner = admin.post("/v1/invitations", json={"email": new_email(), "role": "owner"})
    assert error_of(invite_owner) == (403, "forbidden")
    for answer in (
        admin.patch(f"/v1/staff/{staff_user['id']}", json={"role": "owner"}),
        admin.patch(f"/v1/staff/{church.user_id}", json={"role": "staff"}),
        admin.patch(f"/v1/staff/{other_admin_user['id']}", json={"role": "staff"}),
        admin.delete(f"/v1/staff/{other_admin_user['id']}"),
        admin.delete(f"/v1/staff/{church.user_id}"),
    ):
        assert error_of(answer) == (403, "forbidden"), answer.text
    assert error_of(admin.delete(f"/v1/staff/{admin_user['id']}")) == (409, "conflict")

    # Admins grant staff or admin, and remove staff.
    promoted = admin.patch(f"/v1/staff/{staff_user['id']}", json={"role": "admin"})
    assert promoted.status_code == 200, promoted.text
    assert staff.get("/v1/invitations").status_code == 200
    assert (
        church.session.patch(f"/v1/staff/{staff_user['id']}", json={"role": "staff"}).status_code
        == 200
    )
    removed = admin.delete(f"/v1/staff/{staff_user['id']}")
    assert removed.status_code == 200, removed.text
    assert removed.json()["data"]["id"] == staff_user["id"]
    assert error_of(staff.get("/v1/me")) == (401, "unauthorized")
    assert error_of(admin.get(f"/v1/staff/{staff_user['id']}")) == (404, "not_found")
    login_answer = browser(base_url).post(
        "/v1/auth/login", json={"email": staff_user["email"], "password": "correct horse battery"}
    )
    assert login_answer.status_code == 401

    bad_role = church.session.patch(f"/v1/staff/{admin_user['id']}", json={"role": "pope"})
    assert error_of(bad_role) == (422, "validation_error")
    for client in (admin, other_admin, staff):
        client.close()


def test_invitation_conflicts_replacement_and_revocation(
    church: Church, other_church: Church, stack: Stack, base_url: str
) -> None:
    taken = church.session.post(
        "/v1/invitations", json={"email": other_church.email.upper(), "role": "staff"}
    )
    assert error_of(taken) == (409, "conflict")
    assert taken.json()["error"]["details"][0]["field"] == "email"

    email = new_email()
    first = invite(church, stack, base_url, email, "staff")
    answer = church.session.post("/v1/invitations", json={"email": email, "role": "admin"})
    assert answer.status_code == 201
    outbox_mail(stack, email, "invitation", count=2)
    second_id = answer.json()["data"]["id"]
    pending = church.session.get("/v1/invitations").json()["data"]
    assert [i["id"] for i in pending] == [second_id]
    # Inviting again replaced the first invitation.
    stale = browser(base_url).post(
        "/v1/invitations/accept", json={"token": first, "password": "correct horse battery"}
    )
    assert error_of(stale) == (422, "validation_error")

    revoked = church.session.delete(f"/v1/invitations/{second_id}")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["data"]["status"] == "revoked"
    assert church.session.delete(f"/v1/invitations/{second_id}").status_code == 200
    assert church.session.get("/v1/invitations").json()["data"] == []
    _, body, _, _ = outbox_mail(stack, email, "invitation", count=2)
    second = token_in(body, "accept-invitation", base_url)
    answer = browser(base_url).post(
        "/v1/invitations/accept", json={"token": second, "password": "correct horse battery"}
    )
    assert error_of(answer) == (422, "validation_error")

    # An address that signed up elsewhere after its invitation cannot accept it.
    email = new_email()
    token = invite(church, stack, base_url, email, "staff")
    with browser(base_url) as elsewhere:
        signup = elsewhere.post(
            "/v1/auth/signup",
            json={"church_name": "Elsewhere", "email": email, "password": "correct horse battery"},
        )
        assert signup.status_code == 201
    late = browser(base_url).post(
        "/v1/invitations/accept", json={"token": token, "password": "correct horse battery"}
    )
    assert error_of(late) == (409, "conflict")

    # An accepted invitation cannot be revoked.
    email = new_email()
    token = invite(church, stack, base_url, email, "staff")
    client, _ = accept(base_url, token)
    accepted_id = sql(
        stack,
        "SELECT id FROM staff_invitation WHERE lower(email) = %s AND accepted_at IS NOT NULL",
        (email,),
    )[0][0]
    assert error_of(church.session.delete(f"/v1/invitations/{accepted_id}")) == (409, "conflict")
    client.close()


def test_invitation_expires_after_seven_days(church: Church, stack: Stack, base_url: str) -> None:
    email = new_email()
    token = invite(church, stack, base_url, email, "staff")
    rows = sql(
        stack,
        "SELECT expires_at - created_at FROM staff_invitation WHERE lower(email) = %s",
        (email,),
    )
    assert rows[0][0].days == 7
    sql(
        stack,
        "UPDATE staff_invitation SET expires_at = now() - interval '1 second' "
        "WHERE lower(email) = %s",
        (email,),
    )
    assert church.session.get("/v1/invitations").json()["data"] == []
    answer = browser(base_url).post(
        "/v1/invitations/accept", json={"token": token, "password": "correct horse battery"}
    )
    assert error_of(answer) == (422, "validation_error")
    assert answer.json()["error"]["details"][0]["field"] == "token"


def test_accept_validates_password(church: Church, stack: Stack, base_url: str) -> None:
    token = invite(church, stack, base_url, new_email(), "staff")
    answer = browser(base_url).post(
        "/v1/invitations/accept", json={"token": token, "password": "short"}
    )
    assert error_of(answer) == (422, "validation_error")
    assert answer.json()["error"]["details"][0]["field"] == "password"
    # The failed attempt did not use the invitation up.
    client, _ = accept(base_url, token)
    client.close()


def test_other_churches_staff_and_invitations_are_not_found(
    church: Church, other_church: Church, stack: Stack, base_url: str
) -> None:
    email = new_email()
    invite(church, stack, base_url, email, "staff")
    invitation_id = church.session.get("/v1/invitations").json()["data"][0]["id"]
    outsider = other_church.session
    for answer in (
        outsider.get(f"/v1/staff/{church.user_id}"),
        outsider.patch(f"/v1/staff/{church.user_id}", json={"role": "staff"}),
        outsider.delete(f"/v1/staff/{church.user_id}"),
        outsider.delete(f"/v1/invitations/{invitation_id}"),
        other_church.api.get(f"/v1/staff/{church.user_id}"),
        outsider.get("/v1/staff/not-a-uuid"),
    ):
        assert error_of(answer) == (404, "not_found"), answer.text
    assert [s["id"] for s in outsider.get("/v1/staff").json()["data"]] == [other_church.user_id]
    assert outsider.get("/v1/invitations").json()["data"] == []
    assert church.session.get("/v1/invitations").json()["data"][0]["id"] == invitation_id


def test_cookie_writes_need_the_csrf_token(church: Church, stack: Stack, base_url: str) -> None:
    email = new_email()
    invite(church, stack, base_url, email, "staff")
    invitation_id = church.session.get("/v1/invitations").json()["data"][0]["id"]
    bare = browser(base_url)
    bare.cookies = church.session.cookies
    wrong = browser(base_url)
    wrong.cookies = church.session.cookies
    wrong.headers["X-CSRF-Token"] = "not-the-cookie"
    for client in (bare, wrong):
        for method, path, body in (
            ("POST", "/v1/invitations", {"email": new_email(), "role": "staff"}),
            ("DELETE", f"/v1/invitations/{invitation_id}", None),
            ("PATCH", f"/v1/staff/{church.user_id}", {"role": "owner"}),
            ("DELETE", f"/v1/staff/{church.user_id}", None),
            ("PATCH", "/v1/me", {"name": "Mallory"}),
            (
                "POST",
                "/v1/me/password",
                {"current_password": "correct horse battery", "new_password": "x" * 12},
            ),
        ):
            answer = client.request(method, path, json=body)
            assert error_of(answer) == (403, "forbidden"), (method, path, answer.text)
    # Reads need no CSRF token, and nothing above changed anything.
    assert bare.get("/v1/invitations").json()["data"][0]["id"] == invitation_id
    bare.close()
    wrong.close()


def test_api_keys_read_staff_but_do_not_manage_people(church: Church) -> None:
    assert church.api.get("/v1/staff").status_code == 200
    for answer in (
        church.api.post("/v1/invitations", json={"email": new_email(), "role": "staff"}),
        church.api.get("/v1/invitations"),
        church.api.patch(f"/v1/staff/{church.user_id}", json={"role": "owner"}),
        church.api.delete(f"/v1/staff/{church.user_id}"),
        church.api.patch("/v1/me", json={"name": "Bot"}),
    ):
        assert error_of(answer) == (403, "forbidden"), answer.text


def test_staff_list_pages(church: Church, stack: Stack, base_url: str) -> None:
    clients = [join(church, stack, base_url, "staff")[0] for _ in range(2)]
    first = church.session.get("/v1/staff", params={"limit": 2}).json()
    assert len(first["data"]) == 2
    assert first["meta"]["next_cursor"]
    rest = church.session.get(
        "/v1/staff", params={"limit": 2, "cursor": first["meta"]["next_cursor"]}
    ).json()
    assert len(rest["data"]) == 1
    assert rest["meta"]["next_cursor"] is None
    for client in clients:
        client.close()


@pytest.mark.parametrize(
    ("actor", "current", "new", "allowed"),
    [
        ("owner", "owner", "staff", True),
        ("owner", "staff", "owner", True),
        ("admin", "staff", "admin", True),
        ("admin", "staff", "staff", True),
        ("admin", "staff", "owner", False),
        ("admin", "admin", "staff", False),
        ("admin", "owner", "admin", False),
        ("staff", "staff", "staff", False),
    ],
)
def test_role_change_policy(actor: str, current: str, new: str, allowed: bool) -> None:
    assert (role_change_refusal(actor, current, new) is None) is allowed


def test_removal_and_invitation_policy() -> None:
    assert removal_refusal("owner", "owner") is None
    assert removal_refusal("admin", "staff") is None
    assert removal_refusal("admin", "admin") is not None
    assert removal_refusal("staff", "staff") is not None
    assert invitation_refusal("owner", "owner") is None
    assert invitation_refusal("admin", "admin") is None
    assert invitation_refusal("admin", "owner") is not None
    assert invitation_refusal("staff", "staff") is not None


def test_unknown_fields_are_rejected(church: Church) -> None:
    answer = church.session.post(
        "/v1/invitations", json={"email": new_email(), "role": "staff", "admin": True}
    )
    assert error_of(answer) == (422, "validation_error")
    assert answer.json()["error"]["details"][0]["field"] == "admin"


_ROW = re.compile(r"^\| `(\w+) (\S+)` \| `([\w.]+)` \| ([^|]+) \| ([^|]+) \|$")


def test_permission_table_agrees_with_the_registry() -> None:
    """docs/permissions.md: every row matches its operation, and every staff, auth and
    invitation operation has a row."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "permissions.md").read_text()
    rows = {m.group(3): m.groups() for line in doc.splitlines() if (m := _ROW.match(line))}
    registry = {op.name: op for op in operations()}
    for name, (method, path, _, who, keys) in rows.items():
        op = registry.get(name)
        assert op is not None, f"docs/permissions.md names {name}, which no longer exists"
        assert (method, path) == (op.method, op.path), name
        assert who.strip() == ("anyone (public)" if op.scope is None else op.role), name
        expected_keys = "—" if op.scope is None else ("no" if op.session_only else op.scope)
        assert keys.strip() == expected_keys, name
    missing = set(registry) - set(rows)
    assert not missing, f"docs/permissions.md lacks rows for {sorted(missing)}"
