"""Keywords that join groups: /v1/keywords (docs/protocol.md "Keywords that join groups").

The rules of a keyword (one word of letters and digits, not an SMS keyword, unique in
the church whatever its case) and what an inbound text of one does live in
storage/pg/group_keywords.py; the inbound side runs in delivery/inbound.py.
"""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.branches import Deleted
from api.listing import church_listing, services_of
from api.operation import Operation, audit_target
from api.schemas import NO_NUL
from api.schemas import Request as RequestBody
from api.validation import decode_body, path_id
from storage.pg.group_keywords import (
    MAX_KEYWORD_LENGTH,
    GroupKeyword,
    create_keyword,
    delete_keyword,
    list_keywords,
)
from storage.pg.keywords import MAX_REPLY_LENGTH
from storage.responses import ok

Word = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_KEYWORD_LENGTH,
        pattern=r"^[^\W_]+$",
        description="One word of letters and digits, matched whatever its case; "
        "not STOP, START, HELP or their synonyms.",
    ),
]
Answer = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REPLY_LENGTH, pattern=NO_NUL)]


class KeywordCreate(RequestBody, frozen=True):
    keyword: Word
    group_id: uuid.UUID
    reply: Answer
    repeat_reply: Answer | None = None
    """The answer to someone already in the group; null: a short built-in text."""


async def post_keyword(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, KeywordCreate)
    async with services_of(request).pool.connection() as conn:
        keyword = await create_keyword(
            conn,
            who.church_id,
            keyword=body.keyword,
            group_id=body.group_id,
            reply=body.reply,
            repeat_reply=body.repeat_reply,
        )
    audit_target(request, keyword.id)
    return ok(keyword, status=201)


async def remove_keyword(request: Request) -> Response:
    who = await principal(request, "write")
    keyword_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        await delete_keyword(conn, who.church_id, keyword_id)
    return ok(Deleted(id=keyword_id, deleted=True))


def keyword_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/keywords",
            post_keyword,
            "keyword.create",
            "Add a keyword that joins a group",
            "keywords",
            scope="write",
            body=KeywordCreate,
            response=GroupKeyword,
            status=201,
            errors=("conflict", "not_found"),
            description="A text that is exactly the keyword, or `JOIN <keyword>`, adds its "
            "sender to the group (someone unknown becomes a member) and is answered with "
            "`reply`; texting it again answers `repeat_reply`. Someone who texted STOP is "
            "added but stays opted out and gets no answer.",
            examples={
                "youth": {
                    "keyword": "YOUTH",
                    "group_id": "00000000-0000-7000-8000-000000000000",
                    "reply": "Welcome to Youth Group texts! Reply STOP to opt out.",
                    "repeat_reply": "You're already on the Youth Group list.",
                }
            },
        ),
        Operation(
            "GET",
            "/v1/keywords",
            church_listing(list_keywords),
            "keyword.list",
            "List the keywords that join groups",
            "keywords",
            response=list[GroupKeyword],
            listing=True,
        ),
        Operation(
            "DELETE",
            "/v1/keywords/{id}",
            remove_keyword,
            "keyword.delete",
            "Delete a keyword (the members it added stay in the group)",
            "keywords",
            scope="write",
            response=Deleted,
        ),
    ]
