"""Merge fields in message bodies and templates: ``{{first_name}}`` and friends.

Validated when a template or message is saved (an unknown or malformed field is
a ``validation_error`` then, never a surprise at send time) and rendered per
recipient just before sending.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

FIELDS: dict[str, str] = {
    "first_name": "the member's first name",
    "last_name": "the member's last name",
    "full_name": "first and last name",
    "church_name": "the church's name",
}

_FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def problems(body: str) -> list[str]:
    """What is wrong with the merge fields of ``body`` (empty: nothing)."""
    found: list[str] = []
    for match in _FIELD.finditer(body):
        if match.group(1) not in FIELDS:
            found.append(
                f"unknown merge field {{{{{match.group(1)}}}}}; known: "
                + ", ".join(f"{{{{{name}}}}}" for name in FIELDS)
            )
    rest = _FIELD.sub("", body)
    if "{{" in rest or "}}" in rest:
        found.append("unbalanced {{ or }}; merge fields look like {{first_name}}")
    return found


def names(body: str) -> set[str]:
    return {m.group(1) for m in _FIELD.finditer(body)}


def has_fields(body: str) -> bool:
    return _FIELD.search(body) is not None


def render(body: str, values: Mapping[str, str]) -> str:
    """``body`` with each field replaced; a value the member lacks renders empty."""
    return _FIELD.sub(lambda m: values.get(m.group(1), ""), body).strip()
