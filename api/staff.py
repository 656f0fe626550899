"""Staff management: people and roles, invitations, password reset, one's own account.

Who may do what is in ``docs/permissions.md``; the role rules about other
people (only an owner touches owners and admins, the last owner stays) are in
``storage/pg/staff.py``, applied inside the transaction that makes the change.
Sessions carry the role, so a role change rewrites every live session of that
user, and a removal or password reset ends them (``storage/pg/credentials.py``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import Forbidden, invalid_body
from api.guard import charge_attempt, role_of
from api.listing import church_listing, services_of
from api.operation import Operation, audit_details, audit_target
from api.schemas import Email, Password, SignupData
from api.schemas import OptionalName as PersonName
from api.schemas import Request as Body
from api.sessions import hash_password, password_matches, signed_in
from api.validation import decode_body, path_id
from storage.domain.envelope import FieldError, request_id_var
from storage.domain.errors import NotFound
from storage.pg.audit import record
from storage.pg.churches import get_church
from storage.pg.credentials import delete_user_sessions, set_user_sessions_role
from storage.pg.staff import (
    Invitation,
    NotPermitted,
    StaffMember,
    accept_invitation,
    change_role,
    confirm_password_reset,
    create_invitation,
    create_password_reset,
    get_staff,
    list_invitations,
    list_staff,
    password_hash_of,
    remove_staff,
    revoke_invitation,
    set_name,
    set_password,
)
from storage.process.mail import Mail, Mailer
from storage.process.services import SESSION_COOKIE, Services
from storage.responses import ok

log = logging.getLogger("koinonia.api.staff")

RoleName = Literal["staff", "admin", "owner"]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class StaffPatch(Body, frozen=True):
    role: RoleName


class InvitationRequest(Body, frozen=True):
    email: Email
    role: RoleName = "staff"


class AcceptInvitationRequest(Body, frozen=True):
    token: Token
    password: Password
    name: PersonName = ""


class PasswordResetRequest(Body, frozen=True):
    email: Email


class PasswordResetConfirm(Body, frozen=True):
    token: Token
    password: Password


class PasswordChange(Body, frozen=True):
    current_password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    new_password: Password


class MePatch(Body, frozen=True):
    name: PersonName | None = None


class InvitationCreated(msgspec.Struct, frozen=True):
    id: uuid.UUID
    email: str
    role: str
    status: str
    invited_by: uuid.UUID | None
    created_at: datetime
    expires_at: datetime
    mail_status: str
    """``sent`` (SMTP), ``stored`` (development outbox) or ``failed`` (SMTP refused;
    the invitation stays valid, invite again to resend)."""


class ResetRequested(msgspec.Struct, frozen=True):
    message: str


class PasswordChanged(msgspec.Struct, frozen=True):
    password_changed: bool
    sessions_ended: int


RESET_ANSWER = ResetRequested(
    message="If an account uses this email, a link to reset its password is on its way."
)


@contextmanager
def _permitted() -> Iterator[None]:
    try:
        yield
    except NotPermitted as exc:
        raise Forbidden(str(exc)) from exc


def _mailer(services: Services) -> Mailer:
    return Mailer(services.settings.mail, services.pool)


def _link(services: Services, page: str, token: str) -> str:
    return f"{services.settings.public_url.rstrip('/')}/{page}?token={token}"


def invitation_mail(link: str, token: str, *, to: str, church_name: str, role: str) -> Mail:
    return Mail(
        to=to,
        subject=f"You are invited to {church_name} on Koinonia",
        body=(
            f"You have been invited to join {church_name} on Koinonia as {role}.\n\n"
            f"Accept the invitation and choose your password here (the link works once, "
            f"within 7 days):\n{link}\n\n"
            f"Or enter this invitation code in the app:\n{token}\n\n"
            "If you did not expect this invitation, you can ignore this mail.\n"
        ),
        kind="invitation",
    )


def reset_mail(link: str, token: str, *, to: str, church_name: str) -> Mail:
    return Mail(
        to=to,
        subject="Reset your Koinonia password",
        body=(
            f"Someone asked to reset the password of your Koinonia account at {church_name}.\n\n"
            f"Choose a new password here (the link works once, within 1 hour):\n{link}\n\n"
            f"Or enter this reset code in the app:\n{token}\n\n"
            "If it was not you, ignore this mail: your password stays as it is.\n"
        ),
        kind="password_reset",
    )


async def _audit_public(
    request: Request, church_id: uuid.UUID, user_id: uuid.UUID, action: str, tag: str
) -> None:
    """The audit row of a public route (the guard audits only authenticated ones)."""
    async with services_of(request).pool.connection() as conn:
        await record(
            conn,
            church_id,
            actor_type="user",
            actor_id=user_id,
            action=action,
            target_type=tag,
            target_id=str(user_id),
            request_id=request_id_var.get(),
            ip=request.client.host if request.client else None,
        )


# -- staff -------------------------------------------------------------------------


async def show_staff(request: Request) -> Response:
    who = await principal(request, "read")
    async with services_of(request).pool.connection() as conn:
        member = await get_staff(conn, who.church_id, path_id(request))
    return ok(member)


async def update_staff(request: Request) -> Response:
    who = await principal(request, "write")
    target = path_id(request)
    body = await decode_body(request, StaffPatch)
    services = services_of(request)
    async with services.pool.connection() as conn:
        with _permitted():
            member, previous = await change_role(
                conn, who.church_id, target, body.role, actor_role=role_of(who)
            )
    if previous != member.role:
        await set_user_sessions_role(
            services.redis,
            who.church_id,
            member.id,
            member.role,
            local=services.principals.forget,
        )
    audit_details(request, {"role": member.role, "previous_role": previous})
    return ok(member)


async def delete_staff(request: Request) -> Response:
    who = await principal(request, "write")
    services = services_of(request)
    async with services.pool.connection() as conn:
        with _permitted():
            member = await remove_staff(
                conn,
                who.church_id,
                path_id(request),
                actor_id=who.user_id,
                actor_role=role_of(who),
            )
    await delete_user_sessions(
        services.redis, who.church_id, member.id, local=services.principals.forget
    )
    audit_details(request, {"role": member.role})
    return ok(member)


# -- invitations ---------------------------------------------------------------------


async def invite(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, InvitationRequest)
    services = services_of(request)
    async with services.pool.connection() as conn:
        with _permitted():
            invitation, token = await create_invitation(
                conn,
                who.church_id,
                email=body.email.strip().lower(),
                role=body.role,
                invited_by=who.user_id,
                actor_role=role_of(who),
            )
        church = await get_church(conn, who.church_id)
    if church is None:
        raise NotFound("church")
    mail = invitation_mail(
        _link(services, "accept-invitation", token),
        token,
        to=invitation.email,
        church_name=church.name,
        role=invitation.role,
    )
    sent = await _mailer(services).send(church.id, mail)
    audit_target(request, invitation.id)
    audit_details(request, {"role": invitation.role, "mail_status": sent.status})
    return ok(
        InvitationCreated(
            id=invitation.id,
            email=invitation.email,
            role=invitation.role,
            status=invitation.status,
            invited_by=invitation.invited_by,
            created_at=invitation.created_at,
            expires_at=invitation.expires_at,
            mail_status=sent.status,
        ),
        status=201,
    )


async def revoke(request: Request) -> Response:
    who = await principal(request, "write")
    async with services_of(request).pool.connection() as conn:
        with _permitted():
            invitation = await revoke_invitation(
                conn, who.church_id, path_id(request), actor_role=role_of(who)
            )
    return ok(invitation)


async def accept(request: Request) -> Response:
    """Public: the invited person chooses a password and is signed in (201)."""
    body = await decode_body(request, AcceptInvitationRequest)
    services = services_of(request)
    password_hash = await hash_password(services.settings.security, body.password)
    async with services.pool.connection() as conn:
        user = await accept_invitation(
            conn, body.token, password_hash=password_hash, name=body.name.strip()
        )
        church = await get_church(conn, user.church_id)
    if church is None:
        raise NotFound("church")
    await _audit_public(request, church.id, user.id, "invitation.accept", "staff")
    return await signed_in(services, church, user, status=201)


# -- passwords -------------------------------------------------------------------------


async def request_reset(request: Request) -> Response:
    """Public: always the same 202, whether or not the email has an account; the
    lookup and the mail happen after the answer, so its timing tells nothing either."""
    body = await decode_body(request, PasswordResetRequest)
    email = body.email.strip().lower()
    await charge_attempt(request, "reset", email)
    response = ok(RESET_ANSWER, status=202)
    response.background = BackgroundTask(_send_reset, services_of(request), email)
    return response


async def _send_reset(services: Services, email: str) -> None:
    try:
        async with services.pool.connection() as conn:
            ticket = await create_password_reset(conn, email)
            church = await get_church(conn, ticket.church_id) if ticket else None
        if ticket is None or church is None:
            return
        mail = reset_mail(
            _link(services, "reset-password", ticket.token),
            ticket.token,
            to=ticket.email,
            church_name=church.name,
        )
        await _mailer(services).send(church.id, mail)
    except Exception:
        log.exception("password reset mail failed")


async def confirm_reset(request: Request) -> Response:
    """Public: a reset token sets a new password and ends every session of its user."""
    body = await decode_body(request, PasswordResetConfirm)
    services = services_of(request)
    password_hash = await hash_password(services.settings.security, body.password)
    async with services.pool.connection() as conn:
        church_id, user_id = await confirm_password_reset(conn, body.token, password_hash)
    ended = await delete_user_sessions(
        services.redis, church_id, user_id, local=services.principals.forget
    )
    await _audit_public(request, church_id, user_id, "auth.password_reset.confirm", "auth")
    return ok(PasswordChanged(password_changed=True, sessions_ended=ended))


async def change_password(request: Request) -> Response:
    """The signed-in user's own password: the current one must match (else
    ``validation_error`` on ``current_password``, charged like a failed login);
    every other session of the user ends, this one stays."""
    who = await principal(request, "write")
    body = await decode_body(request, PasswordChange)
    services = services_of(request)
    assert who.user_id is not None  # session_only
    async with services.pool.connection() as conn:
        me = await get_staff(conn, who.church_id, who.user_id)
        stored = await password_hash_of(conn, who.church_id, who.user_id)
    await charge_attempt(request, "login", me.email.lower())
    if not await password_matches(services.settings.security, stored, body.current_password):
        raise invalid_body(FieldError("current_password", "is not your current password"))
    password_hash = await hash_password(services.settings.security, body.new_password)
    async with services.pool.connection() as conn:
        await set_password(conn, who.church_id, who.user_id, password_hash)
    ended = await delete_user_sessions(
        services.redis,
        who.church_id,
        who.user_id,
        keep=request.cookies.get(SESSION_COOKIE),
        local=services.principals.forget,
    )
    return ok(PasswordChanged(password_changed=True, sessions_ended=ended))


async def update_me(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, MePatch)
    assert who.user_id is not None  # session_only
    async with services_of(request).pool.connection() as conn:
        if body.name is None:
            member = await get_staff(conn, who.church_id, who.user_id)
        else:
            member = await set_name(conn, who.church_id, who.user_id, body.name.strip())
    return ok(member)


def staff_operations() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/v1/staff",
            church_listing(list_staff),
            "staff.list",
            "List the church's staff users and their roles",
            "staff",
            response=list[StaffMember],
            listing=True,
        ),
        Operation(
            "GET",
            "/v1/staff/{id}",
            show_staff,
            "staff.show",
            "One staff user",
            "staff",
            response=StaffMember,
        ),
        Operation(
            "PATCH",
            "/v1/staff/{id}",
            update_staff,
            "staff.update",
            "Change a staff user's role (takes effect in their live sessions at once)",
            "staff",
            scope="write",
            role="admin",
            session_only=True,
            body=StaffPatch,
            response=StaffMember,
            errors=("conflict",),
            description=(
                "Admins grant `staff` or `admin`; only an owner grants `owner` or changes "
                "an admin's or owner's role. The last owner cannot be demoted (`conflict`)."
            ),
            examples={"promote": {"role": "admin"}},
        ),
        Operation(
            "DELETE",
            "/v1/staff/{id}",
            delete_staff,
            "staff.remove",
            "Remove a staff user (their sessions end at once)",
            "staff",
            scope="write",
            role="admin",
            session_only=True,
            response=StaffMember,
            errors=("conflict",),
            description=(
                "Admins remove `staff` users; only an owner removes an admin or owner. "
                "Removing yourself or the last owner is a `conflict`."
            ),
        ),
        Operation(
            "POST",
            "/v1/invitations/accept",
            accept,
            "invitation.accept",
            "Accept an invitation: create the account and start a session",
            "staff",
            scope=None,
            body=AcceptInvitationRequest,
            response=SignupData,
            status=201,
            errors=("conflict",),
            description="A bad, used, revoked or expired token is a `validation_error` on `token`.",
            examples={
                "accept": {
                    "token": "token-from-the-invitation-mail",
                    "password": "correct horse battery",
                    "name": "Ruth",
                }
            },
        ),
        Operation(
            "POST",
            "/v1/invitations",
            invite,
            "invitation.create",
            "Invite someone by email to join as staff, admin or owner",
            "staff",
            scope="write",
            role="admin",
            session_only=True,
            body=InvitationRequest,
            response=InvitationCreated,
            status=201,
            errors=("conflict",),
            description=(
                "The mail carries `<public_url>/accept-invitation?token=...` (7 days, single "
                "use). Only an owner invites an owner. An email that already has an account "
                "is a `conflict`; inviting an address again replaces its pending invitation."
            ),
            examples={"admin": {"email": "secretary@grace.example", "role": "admin"}},
        ),
        Operation(
            "GET",
            "/v1/invitations",
            church_listing(list_invitations),
            "invitation.list",
            "List pending invitations",
            "staff",
            role="admin",
            session_only=True,
            response=list[Invitation],
            listing=True,
        ),
        Operation(
            "DELETE",
            "/v1/invitations/{id}",
            revoke,
            "invitation.revoke",
            "Revoke an invitation",
            "staff",
            scope="write",
            role="admin",
            session_only=True,
            response=Invitation,
            errors=("conflict",),
        ),
        Operation(
            "POST",
            "/v1/auth/password-reset",
            request_reset,
            "auth.password_reset",
            "Mail a password reset link (same answer whether or not the account exists)",
            "auth",
            scope=None,
            body=PasswordResetRequest,
            response=ResetRequested,
            status=202,
            errors=("rate_limited",),
            description=(
                "The mail carries `<public_url>/reset-password?token=...` (1 hour, single use). "
                "Limited per account and per client address."
            ),
            examples={"reset": {"email": "pastor@grace.example"}},
        ),
        Operation(
            "POST",
            "/v1/auth/password-reset/confirm",
            confirm_reset,
            "auth.password_reset.confirm",
            "Set a new password with a reset token; every session of the user ends",
            "auth",
            scope=None,
            body=PasswordResetConfirm,
            response=PasswordChanged,
            description="A bad, used or expired token is a `validation_error` on `token`.",
            examples={
                "confirm": {"token": "token-from-the-reset-mail", "password": "a new passphrase"}
            },
        ),
        Operation(
            "POST",
            "/v1/me/password",
            change_password,
            "me.password",
            "Change your own password; your other sessions end",
            "auth",
            scope="write",
            session_only=True,
            body=PasswordChange,
            response=PasswordChanged,
            errors=("rate_limited",),
            description=(
                "A wrong `current_password` is a `validation_error` on that field and counts "
                "as a failed login for the account's limit."
            ),
            examples={
                "change": {
                    "current_password": "correct horse battery",
                    "new_password": "a new passphrase",
                }
            },
        ),
        Operation(
            "PATCH",
            "/v1/me",
            update_me,
            "me.update",
            "Change your own display name",
            "auth",
            scope="write",
            session_only=True,
            body=MePatch,
            response=StaffMember,
            examples={"name": {"name": "Pastor Ann"}},
        ),
    ]
