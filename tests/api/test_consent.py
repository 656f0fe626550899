"""A keyword opt-out binds the church: only the member can undo it."""

from __future__ import annotations

import psycopg

from deploy.stack import Stack
from tests.conftest import Church, unique_phone


def test_staff_cannot_undo_a_keyword_opt_out(church: Church, stack: Stack) -> None:
    member = church.member(unique_phone())
    # Staff opt-outs can be undone by staff.
    assert church.api.post(f"/v1/members/{member}/opt-out").json()["data"]["opted_in"] is False
    back = church.api.post(f"/v1/members/{member}/opt-in")
    assert back.status_code == 200
    assert back.json()["data"]["opted_in"] is True
    # The member texted STOP (what the inbound keyword handler records).
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "UPDATE member SET opted_in = false, opt_source = 'keyword' "
            "WHERE church_id = %s AND id = %s",
            (church.id, member),
        )
    for client in (church.api, church.session):
        refused = client.post(f"/v1/members/{member}/opt-in")
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "conflict"
        assert "START" in refused.json()["error"]["message"]
    shown = church.api.get(f"/v1/members/{member}").json()["data"]
    assert shown["opted_in"] is False
    assert shown["opt_source"] == "keyword"
