"""When a broadcast's last recipient will have been handed to the provider (pure).

Sending is paced by token buckets (storage/redis/send_limits.py): one per sending
number, one for the provider account, and one more for MMS over the account. Each
holds ``rate * burst_s`` tokens and refills at ``rate``; a text takes one token
from every bucket it goes through, whatever its segments. So each bucket that
applies is a queue served at its rate, and a broadcast cannot finish before the
work ahead of it in that queue and its own recipients have passed: the estimate
is the latest of those finishes (each one a lower bound; the slowest queue
decides). With no limit of ours, the workers' recently observed pace stands in
for one rate (at least ``FALLBACK_RATE``), serving the whole account's backlog.

Quiet hours hold a scheduled or recurring broadcast's recipients until their
window opens (storage/domain/quiet_hours.py: the hold is decided when the
recipients are made, and released recipients then go at the pace above). So a
broadcast's recipients arrive as ``Wave``s: all at once at its start, or some at
a later hold. A bucket refills while it waits for a wave.

Once a broadcast is running, its own recent pace (``running_rate``) is one more
lower bound: workers slower than the limits (a slow provider, a busy machine)
finish later than the buckets alone would say.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from storage.domain.quiet_hours import HoldPlan

FALLBACK_RATE = 50.0
"""Texts per second assumed when no limit of ours applies and the workers were not
seen sending faster recently (an idle system): Telnyx's default account pace."""


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Texts per second (0: no limit of ours), as storage/process/settings.py gives them."""

    per_number: float = 0.0
    per_account: float = 0.0
    mms_per_account: float = 0.0
    burst_s: float = 1.0


class Ahead(msgspec.Struct, frozen=True, kw_only=True):
    """Recipients not yet handed over of the work queued before this broadcast."""

    number: int = 0
    """On the same sending number."""
    account: int = 0
    """On the whole provider account (every number, every church)."""
    mms: int = 0
    """MMS recipients on the account (they also pass the MMS bucket)."""


class Wave(msgspec.Struct, frozen=True):
    """``count`` recipients that may go from ``at`` on."""

    at: datetime
    count: int


class Queue(msgspec.Struct, frozen=True):
    """One bucket as a queue: its rate, its burst, and the recipients ahead in it."""

    rate: float
    capacity: float
    ahead: int
    idle: bool = True
    """Nothing has drawn on the bucket lately: it is full. A running broadcast's own
    bucket is not (it draws on it itself)."""


def limited(limits: Limits, *, media: bool) -> bool:
    """Whether a limit of ours paces such a broadcast (else the workers' pace does)."""
    return limits.per_number > 0 or limits.per_account > 0 or (media and limits.mms_per_account > 0)


def queues(
    limits: Limits,
    *,
    media: bool,
    ahead: Ahead,
    recent_rate: float | None = None,
    running: bool = False,
) -> list[Queue]:
    """The queues a broadcast passes. ``recent_rate``: the workers' observed pace over
    the account, used only when no limit of ours applies, and then never below
    ``FALLBACK_RATE``. ``running``: the broadcast is sending already, so
    its buckets are not idle."""
    found: list[Queue] = []

    def add(rate: float, behind: int) -> None:
        if rate > 0:
            capacity = max(1.0, rate * limits.burst_s)
            found.append(Queue(rate, capacity, max(0, behind), idle=not running))

    add(limits.per_number, ahead.number)
    add(limits.per_account, ahead.account)
    if media:
        add(limits.mms_per_account, ahead.mms)
    if not found:
        # A pace observed while the workers had little to do shows the demand, not
        # what they can do: it counts only above the fallback. The workers' pace has
        # no burst (nothing is saved up while they are idle).
        rate = max(recent_rate or 0.0, FALLBACK_RATE)
        found.append(Queue(rate, 0.0, max(0, ahead.account)))
    return found


def drain(queue: Queue, now: datetime, waves: list[Wave]) -> datetime:
    """When the last recipient of ``waves`` passes ``queue``, from ``now``.

    A bucket with work ahead, or drawn on by the broadcast itself, is taken to be
    empty (that work is using its tokens); an idle one is full. While the queue
    waits for a later wave it refills, up to its capacity."""
    t = now
    tokens = queue.capacity if queue.idle and queue.ahead == 0 else 0.0
    t += timedelta(seconds=queue.ahead / queue.rate)
    for wave in sorted(waves, key=lambda w: w.at):
        if wave.count <= 0:
            continue
        if wave.at > t:
            idle = (wave.at - t).total_seconds()
            tokens = min(queue.capacity, tokens + idle * queue.rate)
            t = wave.at
        used = min(tokens, float(wave.count))
        tokens -= used
        t += timedelta(seconds=(wave.count - used) / queue.rate)
    return t


def finishes_at(
    now: datetime,
    waves: list[Wave],
    through: list[Queue],
    *,
    running_rate: float | None = None,
) -> datetime:
    """The latest finish over the queues a broadcast passes (``queues``); ``waves``
    with no recipient left finish ``now`` (or at their start, when later).
    ``running_rate``: this broadcast's own recent pace, once it has been sending
    long enough to tell (a lower bound like the others)."""
    live = [w for w in waves if w.count > 0]
    if not live:
        return max([now, *(w.at for w in waves)])
    ends = [drain(q, now, live) for q in through]
    if running_rate is not None and running_rate > 0:
        ends.append(drain(Queue(running_rate, 0.0, 0), now, live))
    return max(ends)


def start_waves(count: int, start: datetime, plan: HoldPlan | None) -> list[Wave]:
    """A broadcast not yet made into recipients: ``count`` recipients at ``start``, or at
    the church's quiet-hours hold (``plan``, computed for ``start``; None: the
    broadcast is not held, being neither scheduled nor recurring).

    Members with a zone of their own are held by their zone's window, but how many
    live in each zone is only known once the recipients are made: each later zone
    hold counts one recipient, so the estimate is never before the last window
    opens."""
    if plan is None:
        return [Wave(start, count)]
    main = plan.church_hold or start
    waves = [Wave(main, count)]
    for hold in sorted({h for h in plan.zone_holds.values() if h is not None and h > main}):
        waves.append(Wave(hold, 1))
    return waves


def segments_total(recipients: int, segments: int, *, media: bool) -> int:
    """What the broadcast bills: each recipient's text in ``segments`` SMS segments;
    an MMS is one message however long its text (carriers take up to 1,600
    characters with the media, unsplit)."""
    return max(0, recipients) * (1 if media else max(1, segments))
