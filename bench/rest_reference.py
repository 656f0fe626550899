"""The ceiling ``bench/rest.py`` measures Koinonia's list pages against.

A bare Starlette + psycopg app answering the same two paths with the very same
SELECT the endpoint runs (``list_messages_sql`` / ``list_conversations_sql`` of
storage/pg, the same church and limit as the benchmark's requests), on a pool
made as Koinonia makes its own (``open_pool``: same size, autocommit, prepared
statements, jsonb decoded by msgspec), the rows encoded with msgspec as JSON
objects under ``data``. No authentication, rate limit, middleware, envelope
fields, replica routing or logging. Served by uvicorn with the options of
``koinonia web`` (same loop, HTTP implementation, worker count).

    DATABASE_URL=... REFERENCE_CHURCH_ID=... KOINONIA_DB_POOL_MAX=20 \\
        python bench/rest_reference.py --port 8100 --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from storage.pg.conversations import list_conversations_sql  # noqa: E402
from storage.pg.database import Pool, open_pool  # noqa: E402
from storage.pg.messages import list_messages_sql  # noqa: E402
from storage.process.settings import Settings  # noqa: E402

LIMIT = 50
"""Both benchmarked requests ask for (or default to) 50 rows."""

_encoder = msgspec.json.Encoder()

SqlOf = Callable[..., tuple[str, list[Any]]]


def app_from_env() -> Starlette:
    settings = Settings.from_env()
    church = uuid.UUID(os.environ["REFERENCE_CHURCH_ID"])
    pool: Pool | None = None

    def page(sql_of: SqlOf) -> Callable[[Request], Awaitable[Response]]:
        sql, params = sql_of(church, limit=LIMIT, cursor=None)

        async def endpoint(request: Request) -> Response:
            assert pool is not None
            async with pool.connection() as conn:
                cur = await conn.execute(sql, params)
                names = [d.name for d in cur.description or ()]
                rows = await cur.fetchall()
            data = [dict(zip(names, row, strict=True)) for row in rows[:LIMIT]]
            return Response(_encoder.encode({"data": data}), media_type="application/json")

        return endpoint

    async def health(request: Request) -> Response:
        return Response(b"ok")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal pool
        pool = await open_pool(settings.database, name="reference")
        try:
            yield
        finally:
            await pool.close()

    return Starlette(
        routes=[
            Route("/v1/messages", page(list_messages_sql), methods=["GET"]),
            Route("/v1/conversations", page(list_conversations_sql), methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    import uvicorn

    from deploy.cli import _UVICORN_OPTIONS

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    options = {**_UVICORN_OPTIONS, "host": args.host, "port": args.port}
    if args.workers > 1:
        sys.path.insert(0, str(ROOT / "bench"))
        uvicorn.run(
            "rest_reference:app_from_env",
            factory=True,
            workers=args.workers,
            app_dir=str(ROOT / "bench"),
            **options,
        )
    else:
        uvicorn.run(app_from_env(), **options)


if __name__ == "__main__":
    main()
