"""The per-connection state, without sockets."""

from __future__ import annotations

from realtime.close_codes import CloseCode
from realtime.connection import Connection, Limits
from realtime.hub import HubEvent


def event(
    channel: str, ms: int, seq: int = 0, epoch: str = "e1", ephemeral: bool = False
) -> HubEvent:
    frame = f'{{"type":"event","channel":"{channel}","offset":"{ms}-{seq}"}}'
    return HubEvent(
        channel=channel,
        type="conversation.typing" if ephemeral else "message.progress",
        epoch=epoch,
        offset=f"{ms}-{seq}",
        position=(ms, seq),
        frame=frame.encode(),
        text=frame,
        ephemeral=ephemeral,
    )


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def connection(limits: Limits | None = None) -> tuple[Connection[str], Wakes]:
    wakes = Wakes()
    conn: Connection[str] = Connection(
        "c1", limits or Limits(), convert=lambda e: e.text, wake=wakes, now=0.0
    )
    return conn, wakes


def test_push_wakes_the_sender_only_when_the_queue_was_empty() -> None:
    conn, wakes = connection()
    conn.push("a")
    conn.push("b")
    assert list(conn.queue) == ["a", "b"]
    assert wakes.count == 1
    conn.queue.clear()
    conn.push("c")
    assert wakes.count == 2


def test_overflowing_the_send_queue_closes_as_slow_consumer() -> None:
    conn, wakes = connection(Limits(send_queue=3))
    for item in "abc":
        conn.push(item)
    assert conn.close_code is None
    conn.push("d")
    assert conn.close_code == CloseCode.SLOW_CONSUMER
    assert not conn.queue  # nothing more is sent but the close
    assert wakes.count == 2
    conn.push("e")
    assert not conn.queue


def test_frame_rate_is_limited_then_refills_then_closes_when_abused() -> None:
    conn, _ = connection(Limits(frame_rate=10.0, frame_burst=3.0, max_rate_limited=3))
    assert [conn.accept_frame(10, 0.0) for _ in range(4)] == [True, True, True, False]
    assert conn.accept_frame(10, 0.1)  # 0.1 s at 10/s refills one frame
    assert not conn.accept_frame(10, 0.1)
    assert conn.close_code is None
    assert not conn.accept_frame(10, 0.1)
    assert conn.close_code == CloseCode.TOO_MANY


def test_an_oversized_frame_closes_with_1009() -> None:
    conn, _ = connection(Limits(max_frame_bytes=100))
    assert conn.accept_frame(100, 0.0)
    assert not conn.accept_frame(101, 0.0)
    assert conn.close_code == CloseCode.TOO_BIG


def test_ten_bad_frames_close_with_1008_after_what_is_queued() -> None:
    conn, _ = connection()
    for _ in range(9):
        conn.bad_frame()
        conn.push("error")
    assert conn.close_code is None
    conn.bad_frame()
    assert conn.close_code == CloseCode.POLICY
    assert len(conn.queue) == 9  # the error frames still go out before the close
    conn.push("late")
    assert len(conn.queue) == 9


def test_subscription_holds_events_until_live_then_skips_what_replay_covered() -> None:
    conn, _ = connection()
    sub = conn.open("inbox")
    for ms in (1, 2, 3):
        sub.deliver(event("inbox", ms))
    assert not conn.queue
    sub.go_live("e1", (2, 0))  # history replayed up to 2-0
    assert [item for item in conn.queue] == [event("inbox", 3).text]
    sub.deliver(event("inbox", 3))  # a gap fill handing over one already sent
    sub.deliver(event("inbox", 4))
    assert len(conn.queue) == 2
    assert sub.position == (4, 0)


def test_subscription_passes_events_of_a_new_epoch_whatever_their_offset() -> None:
    conn, _ = connection()
    sub = conn.open("inbox")
    sub.go_live("e1", (100, 0))
    sub.deliver(event("inbox", 5, epoch="e2"))
    assert len(conn.queue) == 1
    assert sub.epoch == "e2"


def test_the_same_event_object_is_queued_for_every_connection() -> None:
    first, _ = connection()
    second, _ = connection()
    shared = event("dashboard", 7)
    for conn in (first, second):
        sub = conn.open("dashboard")
        sub.go_live("e1", (0, 0))
        sub.deliver(shared)
    assert first.queue[0] is second.queue[0] is shared.text


def test_held_events_overflowing_close_as_slow_consumer() -> None:
    conn, _ = connection(Limits(send_queue=2))
    sub = conn.open("inbox")
    for ms in (1, 2, 3):
        sub.deliver(event("inbox", ms))
    assert conn.close_code == CloseCode.SLOW_CONSUMER


def test_subscription_limit() -> None:
    conn, _ = connection(Limits(max_subscriptions=2))
    conn.open("inbox")
    conn.open("dashboard")
    assert conn.can_subscribe("inbox")  # re-subscribing does not count twice
    assert not conn.can_subscribe("message:0190e7f5-3c2e-7d4b-9a1c-5f0e6d7c8b9a")
    assert conn.drop("inbox") is not None
    assert conn.can_subscribe("message:0190e7f5-3c2e-7d4b-9a1c-5f0e6d7c8b9a")


def test_typing_passes_only_live_and_at_the_offset_the_subscription_stands_at() -> None:
    conn, _ = connection()
    sub = conn.open("inbox")
    sub.deliver(event("inbox", 2, ephemeral=True))  # held: dropped, not replayed later
    sub.go_live("e1", (2, 0))
    assert not conn.queue
    sub.deliver(event("inbox", 2, ephemeral=True))
    assert len(conn.queue) == 1
    sub.deliver(event("inbox", 1, ephemeral=True))  # older than what the client has
    sub.deliver(event("inbox", 2, epoch="e0", ephemeral=True))  # another epoch
    assert len(conn.queue) == 1
    assert (sub.epoch, sub.position) == ("e1", (2, 0))  # typing never moves the offset
    sub.deliver(event("inbox", 3))
    sub.deliver(event("inbox", 3, ephemeral=True))
    assert len(conn.queue) == 3


def test_revoking_closes_with_4001_and_drops_what_is_queued() -> None:
    conn, wakes = connection()
    conn.push("a")
    conn.revoke()
    assert conn.close_code == CloseCode.REVOKED == 4001
    assert not conn.queue
    assert wakes.count == 2
