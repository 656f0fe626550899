"""Property-based tests of every operation against ``/openapi.json`` (schemathesis).

For each operation, seeded and bounded: valid requests drawn from the schema
(positive) and invalid ones (negative). Every answer must be a non-5xx, with a
documented status and content type, and match its documented schema. Each
operation gets a fresh church, so one operation's side effects (a logout, a
rotated key) cannot starve another of credentials.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.openapi import document
from api.operation import Operation
from api.routes import operations
from tests.conftest import Church

# Slow lane: generated requests against every operation.
pytestmark = pytest.mark.slow


EXAMPLES = 12
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@cache
def _schema() -> Any:
    return schemathesis.openapi.from_dict(document(operations()))


def _credentials(church: Church, op: Operation) -> tuple[dict[str, str], dict[str, str]]:
    if op.scope is None:
        return {}, {}
    if op.session_only:
        return {"X-CSRF-Token": church.csrf}, dict(church.session.cookies)
    return {"Authorization": f"Bearer {church.key}"}, {}


@pytest.mark.parametrize("op", operations(), ids=lambda o: f"{o.method} {o.path}")
def test_operation_honours_its_schema(op: Operation, church: Church, base_url: str) -> None:
    api_operation = _schema()[op.path][op.method]
    headers, cookies = _credentials(church, op)
    modes = [GenerationMode.POSITIVE]
    if op.body is not None or op.query or op.path_params or op.listing:
        modes.append(GenerationMode.NEGATIVE)
    for mode in modes:

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=api_operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            response = case.call(base_url=base_url, headers=headers, cookies=cookies)
            case.validate_response(response, checks=CHECKS, headers=headers)

        run()
