"""A demo church with real history: ``koinonia demo`` (docs/operations.md "Demo data").

Members, groups, broadcasts whose recipients all reached a final status, and
conversations, spread over the past months, so the pages, the benches and the archive
have history to show. Everything is written as the pipeline would have left it:

- every partitioned row's UUIDv7 carries its back-dated creation time, and a
  broadcast's recipient ids are ``recipient_id(message, n)`` as materialize makes them;
- a broadcast's recipients are its audience as ``audience_sql`` defines it at its
  acceptance: members (and memberships) that existed then, opted in then;
- a member who opted out did so by texting STOP (an inbound text and the automatic
  answer in their conversation); the one broadcast accepted just before became a
  ``skipped`` row for them, as a send claimed after an opt-out does;
- a staff reply or an automatic answer is a message of one recipient whose
  ``conversation_message`` shares its id (migration 0008), and a conversation's
  ``last_message_at`` and ``unread_count`` are those of its messages.

The bulk tables are loaded with COPY inside one transaction, so a failed run leaves no
half-built church behind (only the empty monthly partitions it added). The content
(names, groups, texts, statuses, times relative to now) follows ``seed``; ids, the
owner's address and password are new on every run, so runs never collide.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import Any

import msgspec
from psycopg import sql

from storage.domain.ids import uuid7
from storage.domain.phones import PhoneVault
from storage.domain.segments import count_segments
from storage.pg.audit import record
from storage.pg.churches import create_church_with_owner
from storage.pg.credentials import ALL_SCOPES, create_api_key
from storage.pg.database import Conn
from storage.pg.partitions import (
    MONTHS_AHEAD,
    ensure_partitions,
    month_start,
)
from storage.pg.recipients import recipient_id

DEFAULT_MEMBERS = 300
DEFAULT_MONTHS = 30
MAX_MONTHS = 120
MAX_MEMBERS = 200_000
DAYS_PER_MONTH = 30.44

CHURCH_NAME = "Grace Community Church (demo)"

_FIRST = [
    "Ada",
    "Abigail",
    "Amos",
    "Andrea",
    "Angela",
    "Ben",
    "Beatrice",
    "Caleb",
    "Carmen",
    "Chloe",
    "Daniel",
    "David",
    "Deborah",
    "Elijah",
    "Esther",
    "Ezra",
    "Faith",
    "Felix",
    "Grace",
    "Hannah",
    "Isaac",
    "Isaiah",
    "Jacob",
    "James",
    "Joanna",
    "John",
    "Joseph",
    "Joy",
    "Judith",
    "Julia",
    "Kofi",
    "Leah",
    "Lydia",
    "Marcus",
    "Maria",
    "Mark",
    "Martha",
    "Mary",
    "Micah",
    "Miriam",
    "Nathan",
    "Naomi",
    "Noah",
    "Olivia",
    "Paul",
    "Peter",
    "Phoebe",
    "Priscilla",
    "Rachel",
    "Rebecca",
    "Ruth",
    "Samuel",
    "Sarah",
    "Silas",
    "Simon",
    "Stephen",
    "Susanna",
    "Thomas",
    "Timothy",
    "Titus",
    "Zoe",
]
_LAST = [
    "Adams",
    "Allen",
    "Baker",
    "Brown",
    "Campbell",
    "Carter",
    "Clark",
    "Collins",
    "Davis",
    "Edwards",
    "Evans",
    "Garcia",
    "Green",
    "Hall",
    "Harris",
    "Hernandez",
    "Hill",
    "Jackson",
    "Johnson",
    "Jones",
    "King",
    "Lee",
    "Lewis",
    "Lopez",
    "Martin",
    "Martinez",
    "Miller",
    "Mitchell",
    "Moore",
    "Nelson",
    "Okafor",
    "Owusu",
    "Parker",
    "Perez",
    "Phillips",
    "Roberts",
    "Robinson",
    "Rodriguez",
    "Scott",
    "Smith",
    "Taylor",
    "Thomas",
    "Thompson",
    "Turner",
    "Walker",
    "White",
    "Williams",
    "Wilson",
    "Wright",
    "Young",
]
_AREA_CODES = (201, 212, 312, 404, 415, 512, 617, 713, 804, 919)

# (name, share of members in it)
_GROUPS: tuple[tuple[str, float], ...] = (
    ("Choir", 0.12),
    ("Youth", 0.15),
    ("Men's Fellowship", 0.14),
    ("Women's Ministry", 0.16),
    ("Prayer Team", 0.08),
    ("Bible Study", 0.20),
    ("Ushers", 0.06),
    ("Volunteers", 0.18),
    ("Worship Team", 0.05),
    ("Sunday School Teachers", 0.04),
    ("Hospitality", 0.07),
    ("Young Adults", 0.10),
)

_WEEKLY = (
    "Good morning! Service starts at 10am. Coffee and pastries from 9:30 in the hall.",
    "This Sunday: guest speaker Pastor {name}. Bring a friend! Reply with questions.",
    "Reminder: potluck lunch after service this Sunday. Sign-up sheet in the lobby.",
    "Thank you for a wonderful Sunday! Sermon recording is on our website.",
    "Weather update: service is ON this Sunday. Drive safely and dress warmly.",
    "Harvest festival next Saturday from noon. Volunteers needed, reply YES to help! 🎃",
    "Prayer night Wednesday 7pm in the chapel. All are welcome.",
    "Don't forget: clocks change this weekend. Service time stays 10am.",
)
_FOR_GROUP: dict[str, tuple[str, ...]] = {
    "Choir": ("Choir rehearsal moved to 7pm Thursday. See you there!",),
    "Youth": ("Youth group: pizza night this Friday at 6:30 🍕", "Youth retreat forms due Sunday."),
    "Men's Fellowship": ("Men's breakfast Saturday 8am at the diner on Main St.",),
    "Women's Ministry": ("Women's ministry tea on Saturday at 2pm. Bring a friend!",),
    "Prayer Team": ("Prayer chain: please keep the Johnson family in your prayers today.",),
    "Bible Study": ("Bible study tonight 7pm: Romans chapter 8. Bring your notes!",),
    "Ushers": ("Ushers: please arrive by 9:30 this Sunday for the briefing.",),
    "Volunteers": ("Food pantry needs 4 more helpers Saturday morning. Reply if you can come.",),
}
_GENERIC = ("{group}: meeting this week as usual. Thanks for all you do!",)
_INBOUND = (
    "Thanks for the reminder!",
    "Is there childcare on Sunday?",
    "What time does it start?",
    "Count me in 🙌",
    "Can I bring a friend?",
    "Sorry, I can't make it this week.",
    "Where do we park?",
    "Yes, I can help!",
    "Please pray for my mother, she's in hospital.",
    "Is the youth group meeting this Friday?",
)
_REPLIES = (
    "Yes! Childcare is available in room 4.",
    "It starts at 7pm. See you there!",
    "Of course, everyone is welcome.",
    "Thank you, we'll be praying for her.",
    "Parking is behind the hall, on Elm St.",
    "Wonderful, thank you!",
    "No problem, see you next time.",
)
_STOP_ANSWER = (
    "Grace Community Church: you are unsubscribed and will get no more texts. "
    "Reply START to resubscribe."
)
# Carrier error codes (Telnyx): not a mobile number; unreachable handset; carrier spam block.
_LANDLINE = "40001"
_UNDELIVERED = ("40008", "40006", "40002")


class DemoProgress(msgspec.Struct, frozen=True):
    phase: str
    """``partitions``, ``members``, ``broadcasts``, ``conversations``, ``analyze``, ``done``"""
    rows: int
    """Rows written so far, every table."""
    elapsed_s: float


class DemoChurch(msgspec.Struct, frozen=True):
    church_id: uuid.UUID
    owner_id: uuid.UUID
    api_key: str
    """The full secret; only its hash is stored."""
    since: datetime
    """The first member's creation: the start of the history."""
    members: int
    groups: int
    broadcasts: int
    recipients: int
    conversations: int
    conversation_messages: int
    rows: int


@dataclass
class _Member:
    id: uuid.UUID
    created_at: datetime
    first_name: str
    last_name: str
    phone: str
    email: str | None
    groups: list[int]
    opted_out_at: datetime | None = None
    landline: bool = False


@dataclass
class _Text:
    """One text of a conversation."""

    id: uuid.UUID
    at: datetime
    inbound: bool
    body: str
    kind: str = "reply"
    """Outbound only: ``reply`` (staff) or ``answer`` (automatic)."""


@dataclass
class _Thread:
    member: _Member
    texts: list[_Text] = field(default_factory=list)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _id_at(at: datetime) -> tuple[uuid.UUID, datetime]:
    """A UUIDv7 for ``at`` and the millisecond-exact time it carries (what ``created_at``
    must equal for a partitioned row to be found by its id)."""
    ms = _ms(at)
    return uuid7(ms), _at(ms)


class _Builder:
    """Plans the history (pure, from the seed) then writes it with COPY."""

    def __init__(self, *, members: int, months: int, seed: int, now: datetime) -> None:
        self.rng = random.Random(seed)
        self.now = now.astimezone(UTC)
        self.since = self.now - timedelta(days=months * DAYS_PER_MONTH)
        self.count = members
        self.members: list[_Member] = []
        self.group_names = [name for name, _ in _GROUPS[: min(len(_GROUPS), 4 + members // 100)]]
        self.group_ids = [uuid7(_ms(self.since)) for _ in self.group_names]

    # -- planning ------------------------------------------------------------------

    def plan_members(self) -> None:
        rng, span = self.rng, (self.now - self.since).total_seconds()
        phones: set[str] = set()
        shares = [share for _, share in _GROUPS[: len(self.group_names)]]
        for n in range(self.count):
            # Most came in the first fortnight's import, the rest joined over time.
            if rng.random() < 0.7:
                joined = self.since + timedelta(seconds=rng.uniform(0, 14 * 86400))
            else:
                joined = self.since + timedelta(seconds=rng.uniform(0, span * 0.97))
            while True:
                phone = f"+1{rng.choice(_AREA_CODES)}{rng.randint(2_000_000, 9_999_999)}"
                if phone not in phones:
                    phones.add(phone)
                    break
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            email = f"{first}.{last}{n}@example.org".lower() if rng.random() < 0.4 else None
            groups = [g for g, share in enumerate(shares) if rng.random() < share * 1.4]
            member_id, created_at = _id_at(joined)
            self.members.append(_Member(member_id, created_at, first, last, phone, email, groups))
        # By time of joining (stable: ties keep their drawing order), so the seed alone
        # decides every later draw.
        self.members.sort(key=lambda m: m.created_at)
        for member in self.members:
            member.landline = rng.random() < 0.015

    def plan_broadcasts(self) -> list[tuple[datetime, str, int | None]]:
        """(accepted at, body, group index or None for everyone): a weekly message to
        everyone and one to three to a group, in the afternoon (UTC)."""
        rng = self.rng
        planned: list[tuple[datetime, str, int | None]] = []
        # Weeks from a midnight (UTC), so the hours below are times of day.
        week = datetime.combine(self.since.date() + timedelta(days=1), dtime(0), UTC)
        while week < self.now - timedelta(hours=2):
            saturday = week + timedelta(
                days=5, hours=rng.randint(14, 20), minutes=rng.randint(0, 59)
            )
            planned.append((saturday, rng.choice(_WEEKLY).format(name=rng.choice(_LAST)), None))
            for _ in range(rng.randint(1, 3)):
                g = rng.randrange(len(self.group_names))
                name = self.group_names[g]
                body = rng.choice(_FOR_GROUP.get(name, _GENERIC)).format(group=name)
                at = week + timedelta(
                    days=rng.randint(0, 4), hours=rng.randint(13, 22), minutes=rng.randint(0, 59)
                )
                planned.append((at, body, g))
            week += timedelta(days=7)
        return sorted(
            (p for p in planned if p[0] < self.now - timedelta(minutes=10)), key=lambda p: p[0]
        )

    def plan_opt_outs(self, broadcasts: Sequence[datetime]) -> None:
        """About 3% texted STOP half a minute after a broadcast reached them."""
        rng = self.rng
        for member in self.members:
            if rng.random() >= 0.03:
                continue
            after = [at for at in broadcasts if at > member.created_at + timedelta(days=7)]
            if after:
                member.opted_out_at = rng.choice(after) + timedelta(seconds=30)

    def plan_threads(self, broadcasts: Sequence[datetime]) -> list[_Thread]:
        rng, threads = self.rng, []
        talkers = [m for m in self.members if rng.random() < 0.12]
        recent = {m.id for m in rng.sample(talkers, min(len(talkers), max(3, len(talkers) // 15)))}
        for member in talkers:
            thread = _Thread(member)
            end = member.opted_out_at or self.now
            heard = [at for at in broadcasts if member.created_at < at < end]
            if not heard:
                continue
            starts = sorted(rng.sample(heard, min(len(heard), rng.randint(1, 4))))
            if member.id in recent and member.opted_out_at is None:
                starts.append(self.now - timedelta(hours=rng.uniform(1, 60)))
            for n, start in enumerate(starts):
                at = start + timedelta(minutes=rng.uniform(3, 600))
                if at >= self.now - timedelta(minutes=1):
                    continue
                for _ in range(rng.choice((1, 1, 1, 2))):
                    thread.texts.append(_Text(*_id_at(at), True, rng.choice(_INBOUND)))
                    at += timedelta(seconds=rng.uniform(20, 300))
                # The newest exchange of a recent talker waits for an answer (unread).
                if (member.id in recent and n == len(starts) - 1) or rng.random() < 0.2:
                    continue
                at += timedelta(minutes=rng.uniform(2, 180))
                if at < self.now - timedelta(seconds=30):
                    thread.texts.append(_Text(*_id_at(at), False, rng.choice(_REPLIES)))
            if thread.texts:
                threads.append(thread)
        by_member = {t.member.id: t for t in threads}
        for member in self.members:
            if member.opted_out_at is None:
                continue
            thread = by_member.get(member.id) or _Thread(member)
            stop = member.opted_out_at
            # No staff reply after a STOP: the API refuses one to a member opted out.
            thread.texts = [t for t in thread.texts if t.inbound or t.at < stop]
            thread.texts.append(_Text(*_id_at(stop), True, "STOP"))
            thread.texts.append(
                _Text(*_id_at(stop + timedelta(seconds=2)), False, _STOP_ANSWER, "answer")
            )
            if member.id not in by_member:
                threads.append(thread)
        for thread in threads:
            thread.texts.sort(key=lambda t: t.at)
        return threads

    def audience(self, at: datetime, group: int | None) -> list[tuple[_Member, bool]]:
        """(member, skipped) of a broadcast accepted at ``at``, in id order: members
        and memberships made by then, not opted out by then; skipped when they opted
        out after its acceptance but before it was sent (within the minute)."""
        out = []
        for member in self.members:
            if member.created_at > at or (group is not None and group not in member.groups):
                continue
            gone = member.opted_out_at
            if gone is not None and gone <= at:
                continue
            out.append((member, gone is not None and gone - at < timedelta(minutes=1)))
        return out

    def outcome_s(self, member: _Member) -> tuple[str, str | None, float, int]:
        """(status, error code, seconds from sending to the last update, attempts) of
        one text: a landline always fails, a few texts are undelivered, a few fail
        after every retry, the rest are delivered within seconds."""
        rng = self.rng
        if member.landline:
            return "failed", _LANDLINE, rng.uniform(0.2, 2), 1
        roll = rng.random()
        if roll < 0.025:
            return "undelivered", rng.choice(_UNDELIVERED), rng.uniform(5, 120), 1
        if roll < 0.03:
            return "failed", "40006", rng.uniform(30, 600), 3
        return "delivered", None, rng.uniform(1.5, 25), 1

    def outcome(self, member: _Member, sent: datetime) -> tuple[str, str | None, datetime, int]:
        status, error, delay, attempts = self.outcome_s(member)
        return status, error, sent + timedelta(seconds=delay), attempts


def _copy_sql(table: str, columns: str) -> str:
    return f"COPY {table} ({columns}) FROM STDIN"


_MEMBER = (
    "church_id, id, first_name, last_name, email, phone_cipher, phone_hash, opted_in, "
    "opt_source, opt_changed_at, created_at"
)
_MESSAGE = (
    "church_id, id, created_at, body, target, status, recipient_count, segments, encoding, "
    "from_number, created_by, materialized_at, completed_at, kind, conversation_id, "
    "consent_exempt"
)
_RECIPIENT = (
    "church_id, message_id, id, created_at, member_id, status, provider_message_id, "
    "error_code, attempts, segments, updated_at"
)
_CONVERSATION = (
    "church_id, id, member_id, status, unread_count, assignee_id, last_message_at, created_at"
)
_CONVERSATION_MESSAGE = (
    "church_id, id, created_at, conversation_id, direction, body, status, "
    "provider_message_id, sent_by"
)
NULL = "\\N"
"""NULL in COPY's text format."""


def months_between(first: date, last: date) -> int:
    return (last.year - first.year) * 12 + last.month - first.month


async def ensure_demo_partitions(conn: Conn, since: datetime, now: datetime) -> list[str]:
    """The monthly partitions from ``since``'s month to the usual months ahead, under
    the one partition lock (``ensure_partitions``), in a short transaction of its own."""
    first = month_start(since.date())
    async with conn.transaction():
        return await ensure_partitions(
            conn, today=first, ahead=months_between(first, now.date()) + MONTHS_AHEAD
        )


async def create_demo(
    conn: Conn,
    vault: PhoneVault,
    *,
    email: str,
    password_hash: str,
    number_prefix: str,
    members: int = DEFAULT_MEMBERS,
    months: int = DEFAULT_MONTHS,
    seed: int = 1,
    now: datetime | None = None,
    on_progress: Callable[[DemoProgress], None] | None = None,
) -> DemoChurch:
    """Create the demo church on ``conn`` (autocommit: this makes its own transactions).

    ``email`` / ``password_hash``: the owner's login, hashed as sign-up hashes it (the
    caller's business: hashing is the API's). Raises ``Conflict`` when the address is
    taken, ``ValueError`` for a size out of range.
    """
    if not 1 <= members <= MAX_MEMBERS:
        raise ValueError(f"members must be 1 to {MAX_MEMBERS}")
    if not 1 <= months <= MAX_MONTHS:
        raise ValueError(f"months must be 1 to {MAX_MONTHS}")
    started = time.monotonic()
    rows = 0

    def progress(phase: str) -> None:
        if on_progress is not None:
            on_progress(DemoProgress(phase, rows, time.monotonic() - started))

    b = _Builder(members=members, months=months, seed=seed, now=now or datetime.now(UTC))
    b.plan_members()
    planned = b.plan_broadcasts()
    b.plan_opt_outs([at for at, _, _ in planned])
    threads = b.plan_threads([at for at, _, _ in planned])
    await ensure_demo_partitions(conn, b.since, b.now)
    progress("partitions")

    async with conn.transaction():
        church, owner = await create_church_with_owner(
            conn,
            church_name=CHURCH_NAME,
            email=email,
            password_hash=password_hash,
            number_prefix=number_prefix,
        )
        church_id, owner_id, number = church.id, owner.id, church.phone_number
        opened = b.since - timedelta(days=3)
        await conn.execute(
            "UPDATE church SET created_at = %s, quiet_hours_start = '00:00', "
            "quiet_hours_end = '00:00' WHERE id = %s",
            (opened, church_id),
        )
        await conn.execute(
            "UPDATE staff_user SET created_at = %s, name = 'Demo Owner' "
            "WHERE church_id = %s AND id = %s",
            (opened, church_id, owner_id),
        )
        _, api_key = await create_api_key(
            conn, church_id, name="demo", scopes=list(ALL_SCOPES), created_by=owner_id
        )

        cur = conn.cursor()
        async with cur.copy(_copy_sql("member_group", "church_id, id, name, created_at")) as copy:
            for gid, name in zip(b.group_ids, b.group_names, strict=True):
                await copy.write_row((church_id, gid, name, b.since))
        async with cur.copy(_copy_sql("member", _MEMBER)) as copy:
            for m in b.members:
                out = m.opted_out_at
                await copy.write_row(
                    (
                        church_id,
                        m.id,
                        m.first_name,
                        m.last_name,
                        m.email,
                        vault.encrypt(church_id, m.phone),
                        vault.lookup_hash(m.phone),
                        out is None,
                        "import" if out is None else "keyword",
                        m.created_at if out is None else out,
                        m.created_at,
                    )
                )
        rows += len(b.group_ids) + len(b.members)
        async with cur.copy(
            _copy_sql("group_membership", "church_id, group_id, member_id, created_at")
        ) as copy:
            for m in b.members:
                for g in m.groups:
                    await copy.write_row((church_id, b.group_ids[g], m.id, m.created_at))
                    rows += 1
        progress("members")

        segments = {body: count_segments(body) for _, body, _ in planned}
        recipients = 0
        messages: list[tuple[Any, ...]] = []
        church_text = str(church_id)
        member_text = {m.id: str(m.id) for m in b.members}
        async with cur.copy(_copy_sql("message_recipient", _RECIPIENT)) as copy:
            # The bulk of the rows, formatted here as COPY text: psycopg adapting each
            # value of each row costs several times more than the whole f-string.
            lines: list[str] = []
            for accepted, body, group in planned:
                message_id, at = _id_at(accepted)
                info = segments[body]
                audience = b.audience(at, group)
                h = message_id.hex
                prefix = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-"
                head = f"{church_text}\t{message_id}\t"
                at_text = at.isoformat()
                sent = at.timestamp() + 1.0
                last = sent
                for n, (member, skipped) in enumerate(audience, 1):
                    if skipped:
                        status, error, delay, attempts = "skipped", None, 0.0, 0
                    else:
                        status, error, delay, attempts = b.outcome_s(member)
                    rid = f"{prefix}{n:012x}"
                    done = sent + delay
                    sent += 0.02
                    last = max(last, done)
                    provider = NULL if status in ("skipped", "failed") else f"sim-{rid}"
                    lines.append(
                        f"{head}{rid}\t{at_text}\t{member_text[member.id]}\t{status}\t"
                        f"{provider}\t{error or NULL}\t{attempts}\t{info.segments}\t"
                        f"{datetime.fromtimestamp(done, UTC).isoformat()}\n"
                    )
                if len(lines) >= 5000:
                    await copy.write("".join(lines))
                    recipients += len(lines)
                    rows += len(lines)
                    lines = []
                    progress("broadcasts")
                target = (
                    {"all": True} if group is None else {"group_ids": [str(b.group_ids[group])]}
                )
                messages.append(
                    (
                        church_id,
                        message_id,
                        at,
                        body,
                        json.dumps(target),
                        "completed",
                        len(audience),
                        info.segments,
                        info.encoding,
                        number,
                        owner_id,
                        at + timedelta(milliseconds=300),
                        datetime.fromtimestamp(last, UTC),
                        "broadcast",
                        None,
                        False,
                    )
                )
            await copy.write("".join(lines))
            recipients += len(lines)
            rows += len(lines)
            progress("broadcasts")

            conversations: list[tuple[Any, ...]] = []
            thread_rows: list[tuple[Any, ...]] = []
            for thread in threads:
                member, texts = thread.member, thread.texts
                conversation_id = uuid7(_ms(texts[0].at))
                for text in texts:
                    if text.inbound:
                        thread_rows.append(
                            (
                                church_id,
                                text.id,
                                text.at,
                                conversation_id,
                                "inbound",
                                text.body,
                                "received",
                                str(uuid7(_ms(text.at))),
                                None,
                            )
                        )
                        continue
                    info = count_segments(text.body)
                    status, error, finished, attempts = b.outcome(member, text.at)
                    if text.kind == "answer":
                        status, error, finished, attempts = "delivered", None, text.at, 1
                    one = recipient_id(text.id, 1)
                    provider_id = None if status == "failed" else f"sim-{one}"
                    await copy.write_row(
                        (
                            church_id,
                            text.id,
                            one,
                            text.at,
                            member.id,
                            status,
                            provider_id,
                            error,
                            attempts,
                            info.segments,
                            finished,
                        )
                    )
                    rows += 1
                    messages.append(
                        (
                            church_id,
                            text.id,
                            text.at,
                            text.body,
                            json.dumps({"member_ids": [str(member.id)]}),
                            "completed",
                            1,
                            info.segments,
                            info.encoding,
                            number,
                            owner_id if text.kind == "reply" else None,
                            text.at,
                            finished,
                            text.kind,
                            conversation_id,
                            text.kind == "answer",
                        )
                    )
                    thread_rows.append(
                        (
                            church_id,
                            text.id,
                            text.at,
                            conversation_id,
                            "outbound",
                            text.body,
                            status,
                            provider_id,
                            owner_id if text.kind == "reply" else None,
                        )
                    )
                conversations.append(_conversation(b, church_id, conversation_id, thread, owner_id))
        async with cur.copy(_copy_sql("message", _MESSAGE)) as copy:
            for row in messages:
                await copy.write_row(row)
        rows += len(messages)
        progress("conversations")
        async with cur.copy(_copy_sql("conversation", _CONVERSATION)) as copy:
            for row in conversations:
                await copy.write_row(row)
        async with cur.copy(_copy_sql("conversation_message", _CONVERSATION_MESSAGE)) as copy:
            for row in thread_rows:
                await copy.write_row(row)
        rows += len(conversations) + len(thread_rows)
        summary = DemoChurch(
            church_id=church_id,
            owner_id=owner_id,
            api_key=api_key,
            since=min((m.created_at for m in b.members), default=b.since),
            members=len(b.members),
            groups=len(b.group_ids),
            broadcasts=len(planned),
            recipients=recipients,
            conversations=len(conversations),
            conversation_messages=len(thread_rows),
            rows=rows,
        )
        await record(
            conn,
            church_id,
            actor_type="system",
            actor_id=None,
            action="church.demo",
            target_type="church",
            target_id=str(church_id),
            details={"members": members, "months": months, "seed": seed, "rows": rows},
        )
    progress("analyze")
    await analyze(conn)
    progress("done")
    return summary


def _conversation(
    b: _Builder,
    church_id: uuid.UUID,
    conversation_id: uuid.UUID,
    thread: _Thread,
    owner_id: uuid.UUID,
) -> tuple[Any, ...]:
    """The conversation row its texts imply: inbound texts since the last staff reply
    are unread (older than a week: read meanwhile); quiet for a fortnight: closed."""
    texts = thread.texts
    last = texts[-1].at
    unread = 0
    for text in reversed(texts):
        if not text.inbound and text.kind == "reply":
            break
        unread += text.inbound
    if b.now - last > timedelta(days=7):
        unread = 0
    closed = b.now - last > timedelta(days=14) and b.rng.random() < 0.7
    assignee = owner_id if not closed and b.rng.random() < 0.4 else None
    return (
        church_id,
        conversation_id,
        thread.member.id,
        "closed" if closed else "open",
        unread,
        assignee,
        last,
        texts[0].at,
    )


async def analyze(conn: Conn) -> None:
    """Fresh statistics for the member tables the audience and list queries join: one
    planned as empty while it holds thousands of rows gets nested loops that turn
    quadratic (messages.AUDIENCE_PLAN). The partitions are left to autovacuum: one never
    analyzed is planned on its physical size, and sampling every month's recipients
    again would cost more than the whole load."""
    for name in ("member", "member_group", "group_membership", "conversation"):
        await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))
