"""Helpers for tests/deploy/test_nginx.py: web nodes behind nginx, followers, a producer.

- ``Cluster`` starts two more ``koinonia web`` processes on the session's stores
  and the production nginx configuration (rendered by ``deploy.nginx``) in front
  of them; nginx reports the node that answered in ``X-Upstream``.
- ``Follower`` is one WebSocket client that behaves as the protocol asks: it
  keeps the last offset and epoch of every channel, and when its connection
  drops it reconnects and resubscribes with ``since``.
- ``Producer`` publishes numbered events straight through ``EventPublisher``
  (the code every node and worker publishes with) and remembers their ids.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import websockets

from deploy.nginx import Nginx, NginxError, find_nginx
from deploy.stack import Stack, free_ports
from storage.domain.events import (
    AnyEvent,
    ConversationChanged,
    ConversationUpdatedEvent,
    Counts,
    MessageProgress,
    MessageProgressEvent,
)
from storage.redis.publisher import EventPublisher

UPSTREAM_HEADER = "X-Upstream"
NGINX_MISSING = (
    "nginx is not installed: these tests run Debian's nginx in front of two web nodes. "
    "Install it with `apt-get install nginx` (.ci/run does this on a bare machine)."
)


def served_by(upstream_addr: str) -> str:
    """The node that answered: ``$upstream_addr`` lists every node tried, last one last."""
    return upstream_addr.rsplit(",", 1)[-1].strip()


class Cluster:
    """Two web nodes (``a`` and ``b``) on the stack's stores, nginx in front."""

    def __init__(self, stack: Stack, prefix: Path, tag: str) -> None:
        if find_nginx() is None:
            raise NginxError(NGINX_MISSING)
        self.stack = stack
        port_a, port_b, port_nginx = free_ports(3)
        self.names = {"a": f"{tag}_web_a", "b": f"{tag}_web_b"}
        self.nodes = {"a": f"127.0.0.1:{port_a}", "b": f"127.0.0.1:{port_b}"}
        self.nginx = Nginx(
            prefix,
            [self.nodes["a"], self.nodes["b"]],
            port_nginx,
            upstream_header=UPSTREAM_HEADER,
        )
        self.http_url = f"http://127.0.0.1:{port_nginx}"
        self.ws_url = f"ws://127.0.0.1:{port_nginx}/v1/realtime"

    def start(self) -> None:
        for node, name in self.names.items():
            env = dict(self.stack.env)
            env["KOINONIA_HTTP_PORT"] = self.nodes[node].rsplit(":", 1)[1]
            self.stack.spawn(name, "web", env=env)
        for address in self.nodes.values():
            self.stack.wait_ready(f"http://{address}/health/ready")
        self.nginx.start()

    def kill(self, node: str) -> None:
        """SIGKILL: no drain, no close frames; the kernel resets its sockets."""
        self.stack.stop_process(self.names[node], kill=True)

    def stop(self) -> None:
        self.nginx.stop()
        for name in self.names.values():
            self.stack.stop_process(name)


class Follower:
    """One WebSocket client through nginx, following some channels of one church."""

    def __init__(
        self,
        index: int,
        url: str,
        key: str,
        church: str,
        channels: list[str],
        stop: asyncio.Event,
        *,
        expected: int,
    ) -> None:
        self.index = index
        self.url = url
        self.key = key
        self.church = church
        self.channels = channels
        self.stop = stop
        self.received: dict[str, list[str]] = {channel: [] for channel in channels}
        """Event ids per channel, in arrival order."""
        self.since: dict[str, tuple[str, str]] = {}
        """(offset, epoch) of the last event or subscription per channel."""
        self.upstreams: list[str] = []
        """``$upstream_addr`` of every connection made."""
        self.drops: list[str] = []
        """How each established connection was lost."""
        self.refusals: list[str] = []
        """How each failed connection attempt failed."""
        self.resubscribed: list[bool] = []
        """``recovered`` of every subscription sent with ``since``."""
        self.unavailable = 0
        """Subscriptions answered ``unavailable`` (and sent again)."""
        self.problems: list[str] = []
        self.ready = asyncio.Event()
        """Set once every channel is subscribed on the first connection."""
        self.expected = expected
        self.caught_up = asyncio.Event()
        """Set once every channel has had ``expected`` events."""

    @property
    def first_node(self) -> str:
        return served_by(self.upstreams[0]) if self.upstreams else ""

    @property
    def last_node(self) -> str:
        return served_by(self.upstreams[-1]) if self.upstreams else ""

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        while not self.stop.is_set():
            connected = False
            try:
                async with websockets.connect(
                    self.url, additional_headers=headers, open_timeout=5, close_timeout=1
                ) as ws:
                    connected = True
                    assert ws.response is not None
                    self.upstreams.append(ws.response.headers.get(UPSTREAM_HEADER, "?"))
                    await self._session(ws)
            except (websockets.ConnectionClosed, websockets.InvalidHandshake, OSError) as exc:
                if self.stop.is_set():
                    return
                (self.drops if connected else self.refusals).append(repr(exc))
                await asyncio.sleep(random.uniform(0.05, 0.2))

    def _subscribe_frame(self, channel: str) -> str:
        frame: dict[str, Any] = {"type": "subscribe", "id": channel, "channel": channel}
        if channel in self.since:
            offset, epoch = self.since[channel]
            frame["since"] = {"offset": offset, "epoch": epoch}
        return json.dumps(frame)

    async def _session(self, ws: websockets.ClientConnection) -> None:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if welcome.get("type") != "welcome":
            self.problems.append(f"first frame {welcome}")
        loop = asyncio.get_running_loop()
        waiting = set(self.channels)
        resuming = set(self.since)
        # Subscriptions to (re)send and when: an `unavailable` answer means "try
        # again shortly" (docs/protocol.md), with the same `since`.
        due = dict.fromkeys(self.channels, loop.time())
        while not self.stop.is_set():
            now = loop.time()
            for channel, at in list(due.items()):
                if at <= now:
                    del due[channel]
                    await ws.send(self._subscribe_frame(channel))
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.05 if due else 0.25)
            except TimeoutError:
                continue
            frame = json.loads(raw)
            kind, channel = frame.get("type"), frame.get("channel", "")
            if kind == "event":
                if channel not in self.since:
                    self.problems.append(f"event before subscribed on {channel}")
                    continue
                self.received[channel].append(frame["event"]["id"])
                self.since[channel] = (frame["offset"], self.since[channel][1])
                if all(len(ids) >= self.expected for ids in self.received.values()):
                    self.caught_up.set()
            elif kind == "subscribed":
                if channel in resuming:
                    self.resubscribed.append(bool(frame["recovered"]))
                self.since[channel] = (frame["offset"], frame["epoch"])
                waiting.discard(channel)
                if not waiting:
                    self.ready.set()
            elif kind == "error" and frame.get("code") == "unavailable":
                self.unavailable += 1
                due[frame["id"]] = loop.time() + random.uniform(0.1, 0.3)
            else:
                self.problems.append(f"unexpected frame {frame}")


class Producer:
    """Numbered events on ``inbox`` and ``dashboard`` of some churches."""

    def __init__(self, publisher: EventPublisher, churches: list[str], rounds: int) -> None:
        self.publisher = publisher
        self.churches = churches
        self.rounds = rounds
        self.published: dict[tuple[str, str], list[str]] = {
            (church, channel): [] for church in churches for channel in ("inbox", "dashboard")
        }
        """Event ids per (church, channel), in publishing order."""
        self._conversation = uuid.uuid4()
        self._member = uuid.uuid4()
        self._message = uuid.uuid4()

    def events(self, seq: int) -> list[tuple[str, AnyEvent]]:
        """Round ``seq``: a conversation's unread count and a broadcast's delivered
        count both become ``seq``."""
        updated = ConversationUpdatedEvent.new(
            ConversationChanged(
                conversation_id=self._conversation,
                member_id=self._member,
                status="open",
                unread_count=seq,
                assignee_id=None,
                last_message_at=datetime.now(UTC),
            ),
        )
        progress = MessageProgressEvent.new(
            MessageProgress(
                message_id=self._message,
                counts=Counts(delivered=seq, queued=self.rounds - seq),
                recipient_count=self.rounds,
            ),
        )
        return [("inbox", updated), ("dashboard", progress)]

    async def publish_round(self, seq: int) -> None:
        async def one(church: str) -> None:
            items = self.events(seq)
            await self.publisher.publish_many(uuid.UUID(church), items)
            for channel, event in items:
                self.published[(church, channel)].append(event.id)

        await asyncio.gather(*(one(church) for church in self.churches))


def compare(got: list[str], want: list[str]) -> str | None:
    """None when ``got`` is ``want``; otherwise what is wrong, briefly."""
    if got == want:
        return None
    counts = Counter(got)
    rank = {event_id: i for i, event_id in enumerate(want)}
    duplicated = sum(1 for n in counts.values() if n > 1)
    missing = sum(1 for event_id in want if event_id not in counts)
    unknown = sum(1 for event_id in counts if event_id not in rank)
    known = [rank[event_id] for event_id in got if event_id in rank]
    order = "in order" if known == sorted(known) else "out of order"
    return (
        f"{len(got)} received / {len(want)} published: {missing} missing, "
        f"{duplicated} duplicated, {unknown} unknown, {order}"
    )
