"""Request and response bodies of the REST API, as msgspec types.

Schema evolution rules (msgspec habit): a new field always gets a default, a
field's type never changes, and request types forbid unknown fields so a typo
is a clear ``validation_error`` instead of silently ignored input.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from storage.pg.churches import Church, StaffUser
from storage.pg.messages import Target

# Postgres text cannot hold NUL, so every text field refuses it: a validation_error
# naming the field, never a failed INSERT.
NO_NUL = r"^[^\x00]*$"
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)]
OptionalName = Annotated[str, msgspec.Meta(max_length=200, pattern=NO_NUL)]
"""A name that may be empty (a last name)."""
Email = Annotated[
    str, msgspec.Meta(min_length=3, max_length=320, pattern=r"^[^@\s\x00]+@[^@\s\x00]+$")
]
Password = Annotated[str, msgspec.Meta(min_length=12, max_length=1024)]
Body = Annotated[str, msgspec.Meta(min_length=1, max_length=1600, pattern=NO_NUL)]
IdList = Annotated[list[uuid.UUID], msgspec.Meta(min_length=1, max_length=1000)]


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class SignupRequest(Request, frozen=True):
    church_name: Name
    email: Email
    password: Password


class LoginRequest(Request, frozen=True):
    email: Email
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class ApiKeyRequest(Request, frozen=True):
    name: Name
    scopes: list[Literal["read", "write"]] | None = None
    rate_limit_per_min: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None


class GroupMembersRequest(Request, frozen=True):
    member_ids: IdList


class TargetRequest(Request, frozen=True):
    group_ids: IdList | None = None
    member_ids: IdList | None = None
    branch_ids: IdList | None = None
    all: bool | None = None

    def to_target(self) -> Target:
        return Target(
            group_ids=self.group_ids,
            member_ids=self.member_ids,
            branch_ids=self.branch_ids,
            all=self.all,
        )

    def problem(self) -> str | None:
        chosen = [
            n for n in ("group_ids", "member_ids", "branch_ids") if getattr(self, n) is not None
        ]
        if self.all is not None and self.all is not True:
            return "all must be true when given"
        if self.all:
            chosen.append("all")
        if len(chosen) != 1:
            return "give exactly one of group_ids, member_ids, branch_ids or all"
        return None


class ConversationPatch(Request, frozen=True):
    status: Literal["open", "closed"] | None = None
    assignee_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET


class SignupData(msgspec.Struct, frozen=True):
    church: Church
    user: StaffUser


class ApiKeyCreated(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    prefix: str
    scopes: list[str]
    key: str
    created_at: datetime
    rate_limit_per_min: int | None = None


class TicketData(msgspec.Struct, frozen=True):
    ticket: str
    expires_in: int


class LoggedOut(msgspec.Struct, frozen=True):
    logged_out: bool


class Credential(msgspec.Struct, frozen=True):
    kind: str
    scopes: list[str]


class MeData(msgspec.Struct, frozen=True):
    church: Church | None
    user: StaffUser | None
    credential: Credential
