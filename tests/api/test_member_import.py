"""CSV member imports: the streaming parser on its own, then the REST route and the
``koinonia import-members`` command against the running stack."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from deploy.stack import Stack
from storage.pg.member_import import CsvRecords
from tests.conftest import Church, unique_phone

ROOT = Path(__file__).resolve().parents[2]
CSV = {"Content-Type": "text/csv"}


# The parser, without I/O ------------------------------------------------------------


def _records(data: bytes, step: int) -> list[list[str]]:
    parser = CsvRecords()
    out: list[list[str]] = []
    for i in range(0, len(data), step):
        out += parser.feed(data[i : i + step])
    return out + parser.close()


def test_csv_records_survive_any_chunking() -> None:
    text = (
        "\ufeffphone,first_name,last_name\r\n"
        '+12025550143,"Ada ""The Countess""","Love\r\nlace"\r\n'
        "+12025550144,Zoë,Ñandú\r\n"
        "\r\n"
        '+12025550145,"a,b",last'
    )
    expected = [
        ["phone", "first_name", "last_name"],
        ["+12025550143", 'Ada "The Countess"', "Love\r\nlace"],
        ["+12025550144", "Zoë", "Ñandú"],
        [],
        ["+12025550145", "a,b", "last"],
    ]
    data = text.encode()
    for step in (1, 2, 3, 7, 64, len(data)):
        assert _records(data, step) == expected, step


def test_csv_records_read_semicolons_and_tabs() -> None:
    assert _records(b"phone;first_name\n+12025550143;Ada\n", 5) == [
        ["phone", "first_name"],
        ["+12025550143", "Ada"],
    ]
    assert _records(b"phone\tgroups\n+12025550143\tA;B\n", 3) == [
        ["phone", "groups"],
        ["+12025550143", "A;B"],
    ]


# The REST route -------------------------------------------------------------------


def _csv(rows: list[dict[str, str]], columns: list[str]) -> bytes:
    def quote(value: str) -> str:
        if any(c in value for c in ',"\n'):
            return '"' + value.replace('"', '""') + '"'
        return value

    lines = [",".join(columns)] + [",".join(quote(r.get(c, "")) for c in columns) for r in rows]
    return ("\n".join(lines) + "\n").encode()


def _chunks(data: bytes, size: int = 8192) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _import(church: Church, data: bytes, timeout: float = 120) -> dict[str, Any]:
    answer = church.api.post(
        "/v1/members/import", content=_chunks(data), headers=CSV, timeout=timeout
    )
    assert answer.status_code == 200, answer.text
    summary: dict[str, Any] = answer.json()["data"]
    return summary


def _member_count(stack: Stack, church: Church, where: str = "true") -> int:
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM member WHERE church_id = %s AND deleted_at IS NULL AND {where}",
            (church.id,),
        ).fetchone()
    assert row is not None
    return int(row[0])


COLUMNS = ["first_name", "last_name", "phone", "email", "groups", "branch", "opted_in"]
BAD = {7: "phone", 11: "email", 13: "first_name", 17: "opted_in", 19: "branch"}


def _rows(phones: list[str], *, name: str, opt: dict[int, str]) -> list[dict[str, str]]:
    rows = []
    for i, phone in enumerate(phones):
        row = {
            "first_name": f"{name}{i}",
            "last_name": "Member",
            "phone": phone,
            "email": f"m{i}@example.org",
            "groups": "Choir;Youth" if i % 2 == 0 else " choir ",
            "branch": "North" if i % 3 == 0 else "",
            "opted_in": opt.get(i % 10, ""),
        }
        match BAD.get(i % 250):
            case "phone":
                row["phone"] = "12345"
            case "email":
                row["email"] = "not-an-email"
            case "first_name":
                row["first_name"] = ""
            case "opted_in":
                row["opted_in"] = "maybe"
            case "branch":
                row["branch"] = "Nowhere"
        rows.append(row)
    return rows


def test_import_thousands_with_bad_rows_then_reimport_updates(
    church: Church, other_church: Church, stack: Stack
) -> None:
    theirs = other_church.group("Choir")
    north = church.api.post("/v1/branches", json={"name": "north"}).json()["data"]["id"]
    total = 3000
    phones = [unique_phone() for _ in range(total)]
    bad = {i for i in range(total) if i % 250 in BAD}
    good = [i for i in range(total) if i not in bad]

    summary = _import(church, _csv(_rows(phones, name="First", opt={5: "false"}), COLUMNS))
    assert summary["processed"] == total
    assert (summary["created"], summary["updated"], summary["failed"]) == (len(good), 0, len(bad))
    assert len(summary["errors"]) == len(bad) == 60
    assert {(e["row"], e["field"]) for e in summary["errors"]} == {
        (i + 2, BAD[i % 250]) for i in bad
    }
    assert _member_count(stack, church) == len(good)

    groups = {g["name"]: g for g in church.api.get("/v1/groups").json()["data"]}
    assert set(groups) == {"Choir", "Youth"}  # " choir " is the same group as "Choir"
    assert groups["Choir"]["member_count"] == len(good)
    assert groups["Youth"]["member_count"] == len([i for i in good if i % 2 == 0])
    assert _member_count(stack, church, f"branch_id = '{north}'") == len(
        [i for i in good if i % 3 == 0]
    )
    assert _member_count(stack, church, "NOT opted_in") == len([i for i in good if i % 10 == 5])
    assert _member_count(stack, church, "opt_source = 'import'") == len(good)
    found = church.api.get("/v1/members", params={"q": phones[2]}).json()["data"]
    assert [(m["first_name"], m["email"]) for m in found] == [("First2", "m2@example.org")]
    # The other church's group of the same name is untouched.
    assert other_church.api.get(f"/v1/groups/{theirs}").json()["data"]["member_count"] == 0

    # Again, renamed: the same people are updated, nobody is added; "true" never
    # re-subscribes someone who opted out, "false" opts out.
    again = _import(
        church, _csv(_rows(phones, name="Second", opt={5: "true", 6: "false"}), COLUMNS)
    )
    assert (again["created"], again["updated"], again["failed"]) == (0, len(good), len(bad))
    assert _member_count(stack, church) == len(good)
    assert _member_count(stack, church, "first_name LIKE 'Second%%'") == len(good)
    assert _member_count(stack, church, "NOT opted_in") == len(
        [i for i in good if i % 10 in (5, 6)]
    )
    groups = {g["name"]: g for g in church.api.get("/v1/groups").json()["data"]}
    assert groups["Choir"]["member_count"] == len(good)


def test_import_over_the_global_body_limit(church: Church, stack: Stack) -> None:
    rows = [
        {"first_name": "Big", "last_name": "L" * 190, "phone": unique_phone()} for _ in range(6000)
    ]
    data = _csv(rows, ["first_name", "last_name", "phone"])
    assert len(data) > 1_048_576
    # With a Content-Length this time (the middleware judges it against 50 MiB).
    answer = church.api.post("/v1/members/import", content=data, headers=CSV, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["created"] == 6000
    assert _member_count(stack, church) == 6000
    # Other routes keep the global limit.
    assert church.api.post("/v1/groups", content=data).status_code == 413


def test_duplicates_in_one_file_and_existing_members(church: Church) -> None:
    group = church.group("Existing")
    phone = unique_phone()
    known = church.member(phone, [group], email="keep@example.org")
    other = unique_phone()
    data = (
        "Phone,First Name,groups\n"
        f"{phone},,New Group\n"  # an existing member needs no first name
        f"{other},Ann,\n"
        f"{other},Anne,\n"
    ).encode()
    summary = _import(church, data)
    assert (summary["created"], summary["updated"], summary["failed"]) == (1, 2, 0)
    member = church.api.get(f"/v1/members/{known}").json()["data"]
    assert (member["first_name"], member["email"]) == ("Ada", "keep@example.org")
    names = {g["name"]: g["id"] for g in church.api.get("/v1/groups").json()["data"]}
    assert set(member["group_ids"]) == {group, names["New Group"]}
    found = church.api.get("/v1/members", params={"q": other}).json()["data"]
    assert [m["first_name"] for m in found] == ["Anne"]


def test_bad_files_are_refused_before_anything_is_written(church: Church) -> None:
    phone = unique_phone()
    for data, field in [
        (f"first_name,phone,nickname\nA,{phone},x\n".encode(), "header"),
        (f"first_name,mobile\nA,{phone}\n".encode(), "header"),
        (b"", "header"),
        (f"phone,phone\n{phone},{phone}\n".encode(), "header"),
    ]:
        answer = church.api.post("/v1/members/import", content=data, headers=CSV)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["details"][0]["field"] == field
    wrong_type = church.api.post(
        "/v1/members/import",
        content=f"phone\n{phone}\n".encode(),
        headers={"Content-Type": "application/json"},
    )
    assert wrong_type.status_code == 415
    assert church.api.get("/v1/members").json()["data"] == []
    # A read-only key may not import.
    key = church.session.post("/v1/api-keys", json={"name": "ro", "scopes": ["read"]})
    reader = httpx.Client(
        base_url=str(church.api.base_url),
        headers={"Authorization": f"Bearer {key.json()['data']['key']}"},
    )
    with reader:
        refused = reader.post("/v1/members/import", content=b"phone\n", headers=CSV)
        assert refused.status_code == 403


def test_unclosed_quote_stops_the_import_with_a_row_error(church: Church) -> None:
    data = f'phone,first_name\n{unique_phone()},Ada\n{unique_phone()},"Bad\n'.encode()
    data += b"x" * 70_000 + b"\n"
    summary = _import(church, data)
    assert summary["created"] == 1
    assert summary["failed"] == 1
    assert summary["errors"][0]["row"] == 3
    assert summary["errors"][0]["field"] == "row"


def test_invalid_utf8_fails_the_row(church: Church) -> None:
    data = f"phone,first_name\n{unique_phone()},Ada\n".encode()
    data += unique_phone().encode() + b",Gr\xe2ce\n"
    summary = _import(church, data)
    assert (summary["created"], summary["failed"]) == (1, 1)
    assert summary["errors"][0] == {
        "row": 3,
        "field": "first_name",
        "message": "is not valid UTF-8 text",
    }


# The command ------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_import_streams_the_same_way(church: Church, stack: Stack, tmp_path: Path) -> None:
    phones = [unique_phone() for _ in range(800)]
    rows = [{"first_name": f"Cli{i}", "phone": p, "groups": "Cli"} for i, p in enumerate(phones)]
    rows[10]["phone"] = "nope"
    path = tmp_path / "members.csv"
    path.write_bytes(_csv(rows, ["first_name", "phone", "groups"]))
    uv = shutil.which("uv")
    command = [uv, "run", "--no-sync", "koinonia"] if uv else [sys.executable, "-m", "deploy.cli"]
    done = subprocess.run(
        [*command, "import-members", "--church-id", church.id, str(path)],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr  # 1: some rows failed
    summary = json.loads(done.stdout)
    assert (summary["processed"], summary["created"], summary["failed"]) == (800, 799, 1)
    assert summary["errors"] == [
        {"row": 12, "field": "phone", "message": "must be a valid phone number"}
    ]
    assert "rows/s" in done.stderr
    assert "100.0% of file" in done.stderr
    groups = church.api.get("/v1/groups").json()["data"]
    assert [(g["name"], g["member_count"]) for g in groups] == [("Cli", 799)]
    audit = church.session.get("/v1/audit-log", params={"action": "member.import"})
    assert audit.status_code == 200, audit.text
    entry = audit.json()["data"][0]
    assert (entry["actor_type"], entry["details"]["created"]) == ("system", 799)

    again = subprocess.run(
        [*command, "import-members", "--church-id", church.id, str(path)],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = json.loads(again.stdout)
    assert (summary["created"], summary["updated"]) == (0, 799)

    unknown = subprocess.run(
        [
            *command,
            "import-members",
            "--church-id",
            "00000000-0000-7000-8000-000000000000",
            str(path),
        ],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown.returncode == 2
