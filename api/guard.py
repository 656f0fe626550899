"""The guard every REST operation passes through: who, may they, not too often, and
a line in the audit log when a write succeeded."""

from __future__ import annotations

import hashlib
import hmac
import logging

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import ApiError, Forbidden
from api.operation import ROLE_RANK, Handler, Operation
from storage.domain.envelope import request_id_var
from storage.pg.audit import record
from storage.pg.credentials import Principal
from storage.process.services import Services
from storage.redis import key_names
from storage.redis.rate_limits import Verdict

log = logging.getLogger("koinonia.api.guard")

EXTRA_HEADERS = "koinonia.extra_headers"
READ_POSITION = "koinonia.read_position"
"""The church's read position, learnt with the rate limit (api/listing.py ``read``)."""


def role_of(who: Principal) -> str:
    """API keys act as an admin would, within their scopes (never as the owner)."""
    if who.kind == "session":
        return who.role or "staff"
    return "admin"


def monitoring_token(request: Request) -> bool:
    """The request carries ``Bearer $KOINONIA_METRICS_TOKEN`` (never true while the
    token is unset)."""
    services: Services = request.app.state.services
    token = services.settings.metrics.token
    if not token:
        return False
    scheme, _, value = (request.headers.get("authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode(), token.encode()
    )


def add_headers(request: Request, headers: dict[str, str]) -> None:
    """Headers for whatever response this request ends with, errors included
    (the middleware adds them)."""
    extra: list[tuple[bytes, bytes]] = request.scope.setdefault(EXTRA_HEADERS, [])
    extra.extend((k.lower().encode(), v.encode()) for k, v in headers.items())


async def charge(request: Request, who: Principal) -> Verdict:
    """Charge the request to its church's limit and, for an API key, the key's own."""
    services: Services = request.app.state.services
    per_church = await services.church_limits.per_minute(who.church_id)
    limits = [(key_names.church_rate(who.church_id), per_church)]
    if who.api_key_id is not None:
        per_key = who.rate_limit_per_min or services.settings.limits.api_key
        limits.append((key_names.api_key_rate(who.church_id, who.api_key_id), per_key))
    # With replicas, the church's read position comes back in the same Redis call.
    position_key = key_names.read_position(who.church_id) if services.replicas.replicated else None
    verdict = await services.limiter.charge(limits, position_key=position_key)
    add_headers(request, verdict.headers())
    if not verdict.allowed:
        raise ApiError("rate_limited", "too many requests; retry after the time in Retry-After")
    request.scope[READ_POSITION] = verdict.position
    return verdict


async def charge_attempt(request: Request, kind: str, account: str) -> None:
    """Strict limits on guessing: ``kind`` (``login``, ``reset``) per client IP, then
    per account. Refused attempts never reach the password check or the mailer."""
    services: Services = request.app.state.services
    limits = services.settings.limits
    per_ip, per_account = (
        (limits.login_per_ip, limits.login_per_account)
        if kind == "login"
        else (limits.reset_per_ip, limits.reset_per_account)
    )
    ip = request.client.host if request.client else "-"
    # Emails never appear in Redis key names; their digest does.
    account_digest = hashlib.sha256(account.encode()).hexdigest()[:32]
    for key, limit in (
        (key_names.login_rate(f"{kind}-ip", ip), per_ip),
        (key_names.login_rate(f"{kind}-account", account_digest), per_account),
    ):
        verdict = await services.limiter.charge([(key, limit)])
        if not verdict.allowed:
            add_headers(request, verdict.headers())
            raise ApiError("rate_limited", f"too many {kind} attempts; retry later")


def guarded(op: Operation) -> Handler:
    if op.scope is None:
        return op.handler
    scope = op.scope

    async def endpoint(request: Request) -> Response:
        if op.monitoring and monitoring_token(request):
            return await op.handler(request)
        who = await principal(request, scope)
        if op.session_only and who.kind != "session":
            raise Forbidden("only a signed-in staff member can do this, not an API key")
        if ROLE_RANK[role_of(who)] < ROLE_RANK[op.role]:
            raise Forbidden(f"this needs the {op.role} role or higher")
        await charge(request, who)
        response = await op.handler(request)
        if op.method != "GET":
            # Whatever events the write logged are committed now: relay them at once.
            request.app.state.services.relay.kick()
        if op.audited and response.status_code < 400:
            await _audit(request, op, who)
        if op.method != "GET":
            await _remember_write(request, who)
        return response

    return endpoint


async def _remember_write(request: Request, who: Principal) -> None:
    """Before the answer leaves: from then on no node serves this church from a
    replica that has not replayed the write (nor its audit row)."""
    services: Services = request.app.state.services
    try:
        await services.replicas.remember_write(who.church_id)
    except Exception:
        # The write is committed; failing its answer would invite a duplicate retry.
        # Redis or Postgres failed within this request, so the church's next reads
        # most likely fail too rather than read stale.
        log.exception("read position not recorded after a write")


async def _audit(request: Request, op: Operation, who: Principal) -> None:
    services: Services = request.app.state.services
    target = request.scope.get("koinonia.audit_target") or request.path_params.get("id")
    async with services.pool.connection() as conn:
        await record(
            conn,
            who.church_id,
            actor_type="user" if who.kind == "session" else "api_key",
            actor_id=who.user_id if who.kind == "session" else who.api_key_id,
            action=op.name,
            target_type=op.tag,
            target_id=str(target) if target else None,
            details=request.scope.get("koinonia.audit_details") or {},
            request_id=request_id_var.get(),
            ip=request.client.host if request.client else None,
        )
