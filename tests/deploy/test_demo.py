"""``koinonia demo``: a demo church whose back-dated history the API shows as its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.cli import main
from deploy.stack import Stack
from storage.domain.ids import created_at_of

ROOT = Path(__file__).resolve().parents[2]
FINAL = {"delivered", "failed", "undelivered", "skipped"}


STORES = ("DATABASE_URL", "DATABASE_SESSION_URL", "REDIS_URL", "REDIS_CLUSTER_NODES")


def run_demo(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """``koinonia demo`` as a user runs it beside ``koinonia dev``: no store URLs, the
    stack found through ``<data dir>/stack.json``."""
    uv = shutil.which("uv")
    command = [uv, "run", "--no-sync", "koinonia"] if uv else [sys.executable, "-m", "deploy.cli"]
    env = {k: v for k, v in stack.env.items() if k not in STORES}
    return subprocess.run(
        [*command, "demo", *args],
        cwd=ROOT,
        env={**env, "KOINONIA_DATA_DIR": str(stack.data_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def every_page(client: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(200):
        page: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        answer = client.get(path, params={**params, **page})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        rows += body["data"]
        cursor = body.get("next_cursor") or body.get("meta", {}).get("next_cursor")
        if not cursor:
            return rows
    raise AssertionError(f"{path}: more than 200 pages")


@pytest.fixture(scope="module")
def demo(stack: Stack) -> dict[str, str]:
    done = run_demo(stack, "--members", "40", "--months", "4", "--seed", "7")
    assert done.returncode == 0, done.stderr
    # stdout is exactly one JSON object: the login and nothing else.
    assert done.stdout.count("\n") == 1, done.stdout
    created: dict[str, str] = json.loads(done.stdout)
    assert sorted(created) == ["api_key", "church_id", "email", "password"]
    # Progress and the summary went to stderr.
    assert "demo: broadcasts:" in done.stderr, done.stderr
    assert "rows/s" in done.stderr, done.stderr
    assert "40 members" in done.stderr, done.stderr
    assert f"using the stack of `koinonia dev` in {stack.data_dir}" in done.stderr, done.stderr
    return created


@pytest.fixture(scope="module")
def api(demo: dict[str, str], stack: Stack) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{stack.http_port}",
        timeout=10.0,
        headers={"Authorization": f"Bearer {demo['api_key']}"},
    )


def test_the_printed_login_signs_in(demo: dict[str, str], stack: Stack) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=10.0) as browser:
        answer = browser.post(
            "/v1/auth/login", json={"email": demo["email"], "password": demo["password"]}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["church"]["id"] == demo["church_id"]
        wrong = browser.post(
            "/v1/auth/login", json={"email": demo["email"], "password": demo["password"] + "x"}
        )
        assert wrong.status_code == 401


def test_broadcasts_span_the_months_with_final_counts(api: httpx.Client) -> None:
    broadcasts = every_page(api, "/v1/messages")
    assert len(broadcasts) >= 4 * 4 * 2  # a weekly one to everyone and more to groups
    created = [datetime.fromisoformat(b["created_at"]) for b in broadcasts]
    now = datetime.now(UTC)
    assert min(created) < now - timedelta(days=90)
    assert len({(c.year, c.month) for c in created}) >= 4
    for b in broadcasts:
        # Each id carries its back-dated creation time (the partition lookup relies on it).
        assert created_at_of(uuid.UUID(b["id"])) == datetime.fromisoformat(b["created_at"])
        assert b["status"] == "completed"
    totals: Counter[str] = Counter()
    for b in broadcasts[:: max(1, len(broadcasts) // 8)]:
        detail = api.get(f"/v1/messages/{b['id']}")
        assert detail.status_code == 200, detail.text
        counts = detail.json()["data"]["counts"]
        assert sum(counts.values()) == b["recipient_count"] > 0
        assert {s for s, n in counts.items() if n} <= FINAL, counts
        totals.update({s: n for s, n in counts.items() if n})
        recipients = api.get(f"/v1/messages/{b['id']}/recipients", params={"limit": 100})
        assert recipients.status_code == 200, recipients.text
        assert len(recipients.json()["data"]) == min(100, b["recipient_count"])
    assert totals["delivered"] > 0.8 * sum(totals.values()), totals


def test_conversations_have_history(api: httpx.Client) -> None:
    conversations = every_page(api, "/v1/conversations")
    assert conversations
    assert any(c["unread_count"] > 0 for c in conversations)
    newest = conversations[0]
    thread = api.get(f"/v1/conversations/{newest['id']}/messages")
    assert thread.status_code == 200, thread.text
    texts = thread.json()["data"]
    assert texts
    assert texts[0]["created_at"] == newest["last_message_at"]
    directions = Counter(t["direction"] for c in conversations[:10] for t in _thread(api, c))
    assert directions["inbound"] > 0, directions
    assert directions["outbound"] > 0, directions
    members = {c["member_id"] for c in conversations}
    assert len(members) == len(conversations)


def _thread(api: httpx.Client, conversation: dict[str, Any]) -> list[dict[str, Any]]:
    answer = api.get(f"/v1/conversations/{conversation['id']}/messages", params={"limit": 100})
    assert answer.status_code == 200, answer.text
    texts: list[dict[str, Any]] = answer.json()["data"]
    for t in texts:
        if t["direction"] == "outbound":
            assert t["status"] in FINAL, t
    return texts


def test_members_and_groups_are_there(api: httpx.Client) -> None:
    members = every_page(api, "/v1/members")
    assert len(members) == 40
    groups = every_page(api, "/v1/groups")
    assert "Choir" in {g["name"] for g in groups}
    assert sum(g["member_count"] for g in groups) > 0


def test_analytics_cover_the_months(api: httpx.Client) -> None:
    now = datetime.now(UTC)
    answer = api.get(
        "/v1/analytics/summary",
        params={"since": (now - timedelta(days=130)).isoformat(), "until": now.isoformat()},
    )
    assert answer.status_code == 200, answer.text
    summary = answer.json()["data"]
    assert summary["messages_sent"] >= 4 * 4 * 2
    assert summary["members_total"] == 40
    assert summary["inbound_messages"] > 0
    assert 0.8 < summary["delivery_rate"] < 1.0
    old = api.get(
        "/v1/analytics/summary",
        params={
            "since": (now - timedelta(days=125)).isoformat(),
            "until": (now - timedelta(days=60)).isoformat(),
        },
    )
    assert old.status_code == 200, old.text
    assert old.json()["data"]["messages_sent"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--members", "0"], "koinonia: --members must be 1 to 200000"),
        (["--months", "121"], "koinonia: --months must be 1 to 120"),
    ],
)
def test_bad_sizes_are_refused(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["demo", *args])
    assert ended.value.code == message
    assert capsys.readouterr().out == ""
