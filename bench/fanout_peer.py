"""The peer server for ``bench/fanout.py``: python-socketio with AsyncRedisManager.

A Socket.IO ASGI server under uvicorn with the options Koinonia's web process
uses (uvloop, httptools, no per-message deflate), sharing one Redis with its
producer through ``socketio.AsyncRedisManager`` (the cross-node setup its
documentation describes). Rooms stand for channels: a client emits ``join``
with the room's name and gets an acknowledgement once it is in.

Bench-only: needs the ``bench`` dependency group.

    uv run --group bench python bench/fanout_peer.py --port 8030 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse

import socketio
import uvicorn


def create_app(redis_url: str, channel: str = "socketio") -> socketio.ASGIApp:
    # Every node on one ``channel`` receives every event emitted on it (classic
    # PUBLISH), whichever rooms it holds: the adapter's documented cluster setup.
    manager = socketio.AsyncRedisManager(redis_url, channel=channel)
    server = socketio.AsyncServer(async_mode="asgi", client_manager=manager)

    @server.on("join")
    async def join(sid: str, room: str) -> bool:
        await server.enter_room(sid, room)
        return True

    return socketio.ASGIApp(server)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--channel", default="socketio", help="the adapter's pub/sub channel")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.redis_url, args.channel),
        host="127.0.0.1",
        port=args.port,
        log_config=None,
        access_log=False,
        ws_per_message_deflate=False,
        ws_ping_interval=25.0,
        ws_ping_timeout=20.0,
        ws_max_size=65_536,
    )


if __name__ == "__main__":
    main()
