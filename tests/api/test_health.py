"""Health routes: liveness and readiness are open; the detailed view is for operators.

``/health/detailed`` shows queue figures, the provider circuit and cache counters:
owners and admins (API keys act as admins) may read it, staff below admin may not,
and the monitoring system reads it with ``KOINONIA_METRICS_TOKEN`` as a Bearer token.
"""

from __future__ import annotations

import httpx
import pytest

from deploy.stack import Stack
from tests.api.staff_support import join
from tests.conftest import MONITORING, Church

DETAILED = "/health/detailed"


@pytest.mark.parametrize("path", ["/health", "/health/live", "/health/ready"])
def test_liveness_and_readiness_are_open(base_url: str, path: str) -> None:
    answer = httpx.get(base_url + path)
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["status"] == "ok"


def test_the_detailed_view_needs_credentials(base_url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": "Basic x"}):
        answer = httpx.get(base_url + DETAILED, headers=headers)
        assert answer.status_code == 401, headers
        assert answer.json()["error"]["code"] == "unauthorized"


def test_the_detailed_view_is_for_admins_owners_keys_and_the_monitoring_token(
    church: Church, stack: Stack, base_url: str
) -> None:
    staff, _ = join(church, stack, base_url, "staff")
    admin, _ = join(church, stack, base_url, "admin")
    try:
        refused = staff.get(DETAILED)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "forbidden"
        for who, client in (("owner", church.session), ("admin", admin), ("API key", church.api)):
            answer = client.get(DETAILED)
            assert answer.status_code == 200, f"{who}: {answer.text}"
        monitoring = httpx.get(base_url + DETAILED, headers=MONITORING)
        assert monitoring.status_code == 200, monitoring.text
    finally:
        staff.close()
        admin.close()
    checks = monitoring.json()["data"]["checks"]
    assert checks["database"]["ok"] is True
    assert checks["redis"]["ok"] is True
    assert checks["queue"]["provider_circuit"]["state"] in ("closed", "open", "half_open")
    assert "hits" in checks["cache"]
