"""The lookups that replaced the global unique indexes (migration 0011) stay in step
with their owner rows, refuse what the indexes refused, and are filled on upgrade."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import conninfo, errors, sql

from deploy.stack import Stack
from storage.pg.database import migrate, migration_files
from storage.pg.provider_events import NO_CHURCH, record_provider_event
from tests.api.staff_support import accept, invite
from tests.conftest import Church

NIL = str(NO_CHURCH)


def _url(stack: Stack) -> str:
    # CREATE DATABASE and a database of our own need a direct connection.
    return stack.env.get("DATABASE_SESSION_URL") or stack.env["DATABASE_URL"]


def _rows(stack: Stack, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(_url(stack), autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def _secret_prefix(key: str) -> str:
    return key.split("_")[1]


def test_upgrade_fills_the_lookups_from_existing_rows(stack: Stack) -> None:
    """A database at 0010 with data in it: 0011 copies every church number, staff
    address (lower-cased) and live key prefix into the lookups, and keeps the
    provider-event and event-log rows, under the nil church."""
    name = f"upgrade_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_url(stack), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = conninfo.make_conninfo(_url(stack), dbname=name)
    church, user, live, revoked = (uuid.uuid4() for _ in range(4))
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migration "
                "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for migration, text in migration_files():
                if migration >= "0011":
                    break
                with conn.transaction():
                    conn.execute(text.encode())
                    conn.execute("INSERT INTO schema_migration (name) VALUES (%s)", (migration,))
            conn.execute(
                "INSERT INTO church (id, name, phone_number) VALUES (%s, 'Old', '+15550001111')",
                (church,),
            )
            conn.execute(
                "INSERT INTO staff_user (church_id, id, email, password_hash) "
                "VALUES (%s, %s, 'Ruth.Old@Example.org', 'x')",
                (church, user),
            )
            conn.execute(
                "INSERT INTO api_key (church_id, id, name, prefix, secret_hash, scopes, "
                "revoked_at) VALUES (%s, %s, 'live', 'aaaa', '\\x00', '{read}', NULL), "
                "(%s, %s, 'gone', 'bbbb', '\\x00', '{read}', now())",
                (church, live, church, revoked),
            )
            conn.execute(
                "INSERT INTO provider_event (event_id, event_type) "
                "VALUES ('ev-old', 'message.sent')"
            )
            conn.execute("INSERT INTO event_log (items) VALUES ('\\x90')")

        applied = asyncio.run(migrate(url))
        assert applied[0] == "0011_citus_ready"

        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT * FROM church_number_lookup").fetchall() == [
                ("+15550001111", church)
            ]
            assert conn.execute("SELECT * FROM staff_email_lookup").fetchall() == [
                ("ruth.old@example.org", church, user)
            ]
            assert conn.execute("SELECT * FROM api_key_lookup").fetchall() == [
                ("aaaa", church, live)
            ]
            assert conn.execute(
                "SELECT church_id::text, event_id FROM provider_event"
            ).fetchall() == [(NIL, "ev-old")]
            assert conn.execute("SELECT church_id::text FROM event_log").fetchall() == [(NIL,)]
            # What the dropped indexes refused, the lookups' keys refuse.
            with pytest.raises(errors.UniqueViolation):
                conn.execute(
                    "INSERT INTO staff_email_lookup VALUES ('ruth.old@example.org', %s, %s)",
                    (uuid.uuid4(), uuid.uuid4()),
                )
            with pytest.raises(errors.CheckViolation):
                conn.execute(
                    "INSERT INTO staff_email_lookup VALUES ('Ruth.Old@Example.org', %s, %s)",
                    (uuid.uuid4(), uuid.uuid4()),
                )
            with pytest.raises(errors.UniqueViolation):
                conn.execute(
                    "INSERT INTO church_number_lookup VALUES ('+15550001111', %s)", (uuid.uuid4(),)
                )
    finally:
        with psycopg.connect(_url(stack), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def test_api_key_lookup_follows_create_rotate_and_revoke(
    church: Church, stack: Stack, base_url: str
) -> None:
    created = church.session.post("/v1/api-keys", json={"name": "lookup"})
    assert created.status_code == 201, created.text
    key_id, first = created.json()["data"]["id"], created.json()["data"]["key"]
    assert _prefixes(stack, church, key_id) == [_secret_prefix(first)]

    rotated = church.session.post(f"/v1/api-keys/{key_id}/rotate")
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()["data"]["key"]
    assert _prefixes(stack, church, key_id) == [_secret_prefix(second)]
    assert _status(base_url, first) == 401
    assert _status(base_url, second) == 200

    assert church.session.delete(f"/v1/api-keys/{key_id}").status_code == 200
    assert _prefixes(stack, church, key_id) == []
    assert _status(base_url, second) == 401
    # Revoking again stays idempotent; rotating a revoked key is still not found.
    assert church.session.delete(f"/v1/api-keys/{key_id}").status_code == 200
    assert church.session.post(f"/v1/api-keys/{key_id}/rotate").status_code == 404


def _prefixes(stack: Stack, church: Church, key_id: str) -> list[str]:
    rows = _rows(
        stack,
        "SELECT prefix FROM api_key_lookup WHERE church_id = %s AND api_key_id = %s",
        (church.id, key_id),
    )
    return [str(r[0]) for r in rows]


def _status(base_url: str, key: str) -> int:
    answer = httpx.get(
        f"{base_url}/v1/groups", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    return answer.status_code


def test_staff_email_lookup_follows_signup_join_and_removal(
    church: Church, stack: Stack, base_url: str
) -> None:
    def owners_of(email: str) -> list[tuple[str, str]]:
        rows = _rows(
            stack,
            "SELECT church_id::text, user_id::text FROM staff_email_lookup WHERE email = %s",
            (email.lower(),),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    assert owners_of(church.email) == [(church.id, church.user_id)]
    # The same address in another case is the same account: refused as before.
    with httpx.Client(base_url=base_url, timeout=10) as browser:
        again = browser.post(
            "/v1/auth/signup",
            json={
                "church_name": "Twice",
                "email": church.email.upper(),
                "password": "correct horse battery",
            },
        )
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "conflict"
    assert again.json()["error"]["details"][0]["field"] == "email"

    # A user who joins by invitation is in it; removed, the address is free again.
    email = f"Joiner-{uuid.uuid4().hex[:10]}@Example.org"
    token = invite(church, stack, base_url, email, "staff")
    joined, data = accept(base_url, token)
    joined.close()
    user_id = data["user"]["id"]
    assert owners_of(email) == [(church.id, user_id)]
    assert church.session.delete(f"/v1/staff/{user_id}").status_code == 200
    assert owners_of(email) == []
    with httpx.Client(base_url=base_url, timeout=10) as browser:
        fresh = browser.post(
            "/v1/auth/signup",
            json={"church_name": "Anew", "email": email, "password": "correct horse battery"},
        )
        assert fresh.status_code == 201, fresh.text
        # Login and password resets find the account through the lookup.
        login = browser.post(
            "/v1/auth/login", json={"email": email.lower(), "password": "correct horse battery"}
        )
        assert login.status_code == 200, login.text
    assert owners_of(email) == [
        (fresh.json()["data"]["church"]["id"], fresh.json()["data"]["user"]["id"])
    ]


def test_church_number_lookup_names_each_church(church: Church, stack: Stack) -> None:
    rows = _rows(
        stack,
        "SELECT church_id::text FROM church_number_lookup WHERE phone_number = %s",
        (church.phone_number,),
    )
    assert rows == [(church.id,)]


@pytest.mark.anyio
async def test_provider_event_dedupe_is_per_church(stack: Stack) -> None:
    one, other = uuid.uuid4(), uuid.uuid4()
    event_id = f"ev-{uuid.uuid4()}"
    async with await psycopg.AsyncConnection.connect(
        stack.env["DATABASE_URL"], autocommit=True
    ) as conn:
        assert await record_provider_event(conn, one, event_id, "message.sent")
        assert not await record_provider_event(conn, one, event_id, "message.sent")
        # The key is (church, event id): another church's record is another row.
        assert await record_provider_event(conn, other, event_id, "message.sent")
