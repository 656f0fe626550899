"""A provider outage, then a burst of 429s: everything is delivered afterwards, once,
and nothing is dead-lettered early.

Time is compressed through the suite's settings (tests/conftest.py: first retry
after 0.2 s instead of 2 s, 5 attempts), so a 6-second outage here stands for a
minute-long one in production (bench/outage.py runs that one at full length).
Refusals the provider answers for all senders alike (503 during an outage, 429
with Retry-After while over its rate) say nothing about the recipient: they must
not use up the recipient's attempts, which are for failures of that one send.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from deploy.stack import Stack
from tests.conftest import Church
from tests.delivery.test_crash import (
    Counts,
    bulk_audience,
    counts_of,
    dead_letters,
    final,
    recipient_summary,
)
from tests.delivery.test_durability import _once_each

# Slow lane: provider outages and 429 storms, in real time.
pytestmark = pytest.mark.slow


AUDIENCE = 300
OUTAGE_S = 6.0
"""Longer than the retry schedule's whole span here (5 attempts: about 4-5 s)."""
BURST_S = 6.0
RATE_PER_S = 25.0
"""The provider's limit during the burst: 300 recipients need 12 s of it."""
RECOVER_S = 90.0


@pytest.fixture
def provider(sim_url: str) -> Iterator[httpx.Client]:
    """The simulator's control API; its configuration is back to normal afterwards
    whatever happens, so later tests meet a healthy provider."""
    client = httpx.Client(base_url=sim_url, timeout=10)
    yield client
    client.post("/_sim/config", json={"outage": False, "rate_limit_per_s": None}).raise_for_status()
    client.close()


def _configure(provider: httpx.Client, **config: object) -> None:
    provider.post("/_sim/config", json=config).raise_for_status()


def _follow(
    church: Church, message_id: str, until: float, timeline: list[tuple[float, Counts]]
) -> None:
    """Sample the broadcast's counts until the monotonic time ``until``."""
    while time.monotonic() < until:
        timeline.append((time.monotonic(), counts_of(church, message_id)))
        time.sleep(0.25)


def _when_failed(timeline: list[tuple[float, Counts]], start: float) -> str:
    """When recipients first turned ``failed``, for the assertion message."""
    for at, counts in timeline:
        if counts["failed"]:
            return f"{counts['failed']} failed {at - start:.1f} s after the outage began"
    return "none failed"


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("outage_s", "burst_s"),
    [pytest.param(OUTAGE_S, BURST_S, id="outage-then-429s"), pytest.param(0.0, BURST_S, id="429s")],
)
def test_outage_and_429s_delay_delivery_but_fail_no_one(
    church: Church,
    stack: Stack,
    sim_url: str,
    provider: httpx.Client,
    outage_s: float,
    burst_s: float,
) -> None:
    """The broadcast starts into the outage (every first attempt refused), the provider
    then admits RATE_PER_S for BURST_S, then everything: all 300 delivered once, none
    failed, no dead letter."""
    group, phones = bulk_audience(church, AUDIENCE)
    timeline: list[tuple[float, Counts]] = []

    _configure(provider, outage=outage_s > 0)
    outage_began = time.monotonic()
    message_id = church.broadcast(group, "Outage test")
    _follow(church, message_id, outage_began + outage_s, timeline)

    _configure(provider, outage=False, rate_limit_per_s=RATE_PER_S)
    burst_began = time.monotonic()
    _follow(church, message_id, burst_began + burst_s, timeline)

    _configure(provider, rate_limit_per_s=None)
    deadline = time.monotonic() + RECOVER_S
    while time.monotonic() < deadline:
        timeline.append((time.monotonic(), counts := counts_of(church, message_id)))
        if final(counts) == AUDIENCE:
            break
        time.sleep(0.25)
    counts = timeline[-1][1]
    print(
        f"\noutage {outage_s:.0f} s + 429 burst {burst_s:.0f} s at {RATE_PER_S:.0f}/s: "
        f"{counts} {timeline[-1][0] - outage_began:.1f} s after the outage began; "
        f"{_when_failed(timeline, outage_began)}"
    )

    dead = dead_letters(stack, message_id)
    summary = recipient_summary(stack, message_id)
    assert dead == [], (
        f"dead-lettered early: {sum(n for _, n in dead)} recipients {dead}; "
        f"{_when_failed(timeline, outage_began)}; (status, error, attempts, rows): {summary}"
    )
    assert counts["delivered"] == AUDIENCE, (counts, summary)
    assert counts["failed"] == 0, (counts, summary)
    _once_each(sim_url, phones)
