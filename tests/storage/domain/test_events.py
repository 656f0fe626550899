"""The event union against docs/protocol.md's event table, and its wire form."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from storage.domain.events import (
    EVENT_KINDS,
    EVENT_TYPES,
    WEBHOOK_EVENT_TYPES,
    AnyEvent,
    Event,
    MemberChanged,
    MemberCreatedEvent,
    MemberOptChanged,
    MemberOptedOutEvent,
    WebhookEndpointTest,
    WebhookEndpointTestEvent,
    encode,
    tag_of,
)

PROTOCOL = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"


class Row(msgspec.Struct, frozen=True):
    types: tuple[str, ...]
    fields: frozenset[str]
    webhooks: str


def table_rows() -> list[Row]:
    """The rows of the table in the "Events" section: ``| types | data | channels |
    webhooks |``, each name in backticks; what is in parentheses is commentary."""
    text = PROTOCOL.read_text()
    section = text.split("\n## Events\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, line
        types, data, _, webhooks = cells
        rows.append(
            Row(
                types=tuple(re.findall(r"`([^`]+)`", types)),
                fields=frozenset(re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", data))),
                webhooks=webhooks,
            )
        )
    assert rows, "no event table in docs/protocol.md"
    return rows


def payload_fields(kind: type[Event[Any]]) -> frozenset[str]:
    (data,) = [f for f in msgspec.structs.fields(kind) if f.name == "data"]
    assert isinstance(data.type, type), kind
    return frozenset(f.encode_name for f in msgspec.structs.fields(data.type))


def test_the_protocol_table_lists_exactly_the_union() -> None:
    documented = [t for row in table_rows() for t in row.types]
    assert len(documented) == len(set(documented)), "a type documented twice"
    assert set(documented) == set(EVENT_TYPES)
    assert len(EVENT_TYPES) == len(set(EVENT_TYPES)), "a tag used twice"


def test_the_protocol_table_lists_each_payloads_fields() -> None:
    by_tag = {tag_of(k): k for k in EVENT_KINDS}
    for row in table_rows():
        for t in row.types:
            assert row.fields == payload_fields(by_tag[t]), t


def test_webhooks_get_what_the_table_says() -> None:
    subscribable = {t for row in table_rows() if row.webhooks == "yes" for t in row.types}
    assert subscribable == WEBHOOK_EVENT_TYPES


def test_the_wire_form_is_type_id_time_data() -> None:
    member_id = uuid.uuid4()
    event = MemberOptedOutEvent.new(MemberOptChanged(member_id=member_id, source="import"))
    assert event.type == "member.opted_out"
    raw = msgspec.json.decode(encode(event))
    assert list(raw) == ["type", "id", "occurred_at", "data"]
    assert raw["type"] == "member.opted_out"
    assert raw["id"] == event.id
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", raw["occurred_at"])
    assert raw["data"] == {"member_id": str(member_id), "source": "import"}
    assert msgspec.json.decode(encode(event), type=AnyEvent) == event


def test_each_event_is_new() -> None:
    data = MemberChanged(member_id=uuid.uuid4())
    first, second = MemberCreatedEvent.new(data), MemberCreatedEvent.new(data)
    assert first.id != second.id
    assert uuid.UUID(first.id).version == 7


def test_every_type_round_trips_with_its_own_class() -> None:
    endpoint_id = uuid.uuid4()
    event = WebhookEndpointTestEvent.new(WebhookEndpointTest(endpoint_id=endpoint_id))
    back = msgspec.json.decode(encode(event), type=AnyEvent)
    assert isinstance(back, WebhookEndpointTestEvent)
    assert back.data.endpoint_id == endpoint_id


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        # a member's payload under a message type
        ("message.created", {"member_id": "0190c4b4-54c1-7000-8000-000000000001"}),
        # an opt-in needs its source
        ("member.opted_in", {"member_id": "0190c4b4-54c1-7000-8000-000000000001"}),
        # created carries no source
        (
            "member.created",
            {"member_id": "0190c4b4-54c1-7000-8000-000000000001", "source": "api"},
        ),
        ("conversation.typing", {"conversation_id": "0190c4b4-54c1-7000-8000-000000000001"}),
    ],
)
def test_data_that_does_not_match_its_type_does_not_decode(
    event_type: str, data: dict[str, Any]
) -> None:
    raw = msgspec.json.encode(
        {"type": event_type, "id": "x", "occurred_at": "2025-01-01T00:00:00.000Z", "data": data}
    )
    with pytest.raises(msgspec.ValidationError, match=r"\$\.data"):
        msgspec.json.decode(raw, type=AnyEvent)


def test_an_unknown_type_does_not_decode() -> None:
    raw = b'{"type":"member.deleted","id":"x","occurred_at":"t","data":{}}'
    with pytest.raises(msgspec.ValidationError, match=r"Invalid value 'member\.deleted'"):
        msgspec.json.decode(raw, type=AnyEvent)
