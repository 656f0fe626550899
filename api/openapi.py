"""The OpenAPI 3.1 document, generated from the operations and their msgspec types,
and the offline explorer at ``/docs``.

Nothing here is written by hand per route: schemas come from
``msgspec.json.schema_components`` over the very types the handlers decode and
encode, and the possible errors of an operation follow from what it declares
(credentials, a body, path ids, query parameters, extra codes).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import swagger_ui
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from api.operation import Operation
from storage.domain.envelope import STATUS
from storage.responses import JSONResponse

_REF = "#/components/schemas/{name}"

_DESCRIPTION = """\
Koinonia's REST API for church texting: members and groups, broadcasts with live
delivery status, the shared inbox, webhooks.

**Envelope.** Every answer is `{"success": true, "data": ..., "meta": {"request_id"}}`
or `{"success": false, "error": {"code", "message", "details"}, "meta": {...}}`.
Lists add `meta.next_cursor` and take `?limit=` (1 to 200, default 50) and `?cursor=`.

**Auth.** `Authorization: Bearer <api key>`, or a staff session cookie from
`POST /v1/auth/login`; cookie-authenticated writes send `X-CSRF-Token` equal to
the `koinonia_csrf` cookie. `x-required-role` on each operation gives the least
staff role allowed (API keys act as `admin` within their scopes);
`x-session-only` operations refuse API keys.

**Limits.** Requests are limited per church by plan and per API key; answers
carry `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` and, on `429`,
`Retry-After` (seconds).

**Error codes** (stable): """ + ", ".join(f"`{code}` ({status})" for code, status in STATUS.items())

_STATUS_TEXT = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Validation error",
    429: "Rate limited",
    503: "Unavailable",
}


def _error_codes(op: Operation) -> set[str]:
    codes = set(op.errors)
    if op.scope is not None:
        codes |= {"unauthorized", "forbidden", "rate_limited"}
    if op.body is not None:
        codes |= {"bad_request", "payload_too_large", "unsupported_media_type", "validation_error"}
    if op.path_params:
        codes.add("not_found")
    if op.listing or op.query:
        codes.add("validation_error")
    return codes


def _envelope_components() -> dict[str, Any]:
    return {
        "Meta": {
            "type": "object",
            "properties": {
                "request_id": {"type": "string"},
                "next_cursor": {"type": ["string", "null"]},
            },
            "required": ["request_id"],
        },
        "FieldProblem": {
            "type": "object",
            "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            "required": ["field", "message"],
        },
        "Error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "enum": sorted(STATUS)},
                "message": {"type": "string"},
                "details": {},
            },
            "required": ["code", "message"],
        },
        "ErrorEnvelope": {
            "type": "object",
            "properties": {
                "success": {"const": False},
                "error": {"$ref": _REF.format(name="Error")},
                "meta": {"$ref": _REF.format(name="Meta")},
            },
            "required": ["success", "error", "meta"],
        },
    }


def _success(data_schema: dict[str, Any] | None, listing: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {"$ref": _REF.format(name="Meta")}
    if listing:
        meta = {
            "allOf": [meta, {"type": "object", "required": ["next_cursor"]}],
        }
    return {
        "type": "object",
        "properties": {
            "success": {"const": True},
            "data": data_schema if data_schema is not None else {},
            "meta": meta,
        },
        "required": ["success", "data", "meta"],
    }


def _parameters(op: Operation, schema_of: Callable[[Any], dict[str, Any]]) -> list[Any]:
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "format": "uuid"},
        }
        for name in op.path_params
    ]
    if op.listing:
        params.append(
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                "description": "page size",
            }
        )
        params.append(
            {
                "name": "cursor",
                "in": "query",
                "schema": {"type": "string"},
                "description": "`meta.next_cursor` of the previous page",
            }
        )
    for q in op.query:
        schema = schema_of(q.kind)
        if q.many:
            schema = {"type": "array", "items": schema}
        params.append(
            {
                "name": q.name,
                "in": "query",
                "schema": schema,
                "description": q.description,
                **({"style": "form", "explode": True} if q.many else {}),
            }
        )
    return params


def _scalar_schema(kind: Any) -> dict[str, Any]:
    schema = msgspec.json.schema(kind)
    schema.pop("$defs", None)
    return schema


def document(operations: list[Operation], *, server_url: str | None = None) -> dict[str, Any]:
    kinds: list[Any] = []
    for op in operations:
        if op.body is not None and op.body is not str:
            kinds.append(op.body)
        if op.response is not None:
            kinds.append(op.response)
    schemas, components = msgspec.json.schema_components(kinds, ref_template=_REF)
    by_kind = {id(k): s for k, s in zip(kinds, schemas, strict=True)}
    components.update(_envelope_components())

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        responses: dict[str, Any] = {
            str(op.status): {
                "description": op.summary,
                "content": {
                    "application/json": {
                        "schema": _success(
                            by_kind.get(id(op.response)) if op.response is not None else None,
                            op.listing,
                        )
                    }
                },
            }
        }
        by_status: dict[int, list[str]] = {}
        for code in sorted(_error_codes(op)):
            by_status.setdefault(STATUS[code], []).append(code)
        for status, codes in sorted(by_status.items()):
            responses[str(status)] = {
                "description": f"{_STATUS_TEXT.get(status, 'Error')}: "
                + ", ".join(f"`{c}`" for c in codes),
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(name="ErrorEnvelope")}}
                },
            }
        responses["default"] = {
            "description": "Unexpected error (`internal_error`, `unavailable`)",
            "content": {
                "application/json": {"schema": {"$ref": _REF.format(name="ErrorEnvelope")}}
            },
        }
        entry: dict[str, Any] = {
            "operationId": op.name,
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": _parameters(op, _scalar_schema),
            "responses": responses,
        }
        if op.description:
            entry["description"] = op.description
        if op.body is not None:
            body_schema = {"type": "string"} if op.body is str else by_kind[id(op.body)]
            media: dict[str, Any] = {"schema": body_schema}
            if op.examples:
                media["examples"] = {k: {"value": v} for k, v in op.examples.items()}
            entry["requestBody"] = {"required": True, "content": {op.body_media_type: media}}
        if op.scope is None:
            entry["security"] = []
        else:
            entry["security"] = (
                [{"sessionCookie": []}]
                if op.session_only
                else [{"bearerAuth": []}, {"sessionCookie": []}]
            )
            entry["x-required-scope"] = op.scope
            entry["x-required-role"] = op.role
            entry["x-session-only"] = op.session_only
        paths.setdefault(op.path, {})[op.method.lower()] = entry

    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Koinonia API",
            "version": _version(),
            "description": _DESCRIPTION,
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: `kn_<prefix>_<secret>`",
                },
                "sessionCookie": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "koinonia_session",
                    "description": "Staff session; writes also send X-CSRF-Token",
                },
            },
        },
        "tags": sorted(
            ({"name": t} for t in {op.tag for op in operations}), key=lambda t: t["name"]
        ),
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc


def _version() -> str:
    try:
        return importlib.metadata.version("koinonia")
    except importlib.metadata.PackageNotFoundError:
        return "1"


_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Koinonia API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" href="/docs/assets/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/explorer.js"></script>
</body>
</html>
"""

# Cookie-authenticated writes need the CSRF cookie echoed in a header; the explorer
# adds it so "Try it out" works for a signed-in staff member as well as with a key.
_EXPLORER_JS = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
    requestInterceptor: function (req) {
      var m = document.cookie.match(/(?:^|; )koinonia_csrf=([^;]*)/);
      if (m) { req.headers["X-CSRF-Token"] = decodeURIComponent(m[1]); }
      return req;
    }
  });
};
"""


def docs_routes(operations: Callable[[], list[Operation]]) -> list[BaseRoute]:
    cached: dict[str, bytes] = {}

    async def openapi_json(request: Request) -> Response:
        if "doc" not in cached:
            cached["doc"] = msgspec.json.encode(document(operations()))
        return JSONResponse(cached["doc"])

    async def docs(request: Request) -> Response:
        return HTMLResponse(_DOCS_PAGE)

    async def explorer(request: Request) -> Response:
        return Response(_EXPLORER_JS, media_type="text/javascript")

    assets = Path(swagger_ui.__file__).parent / "static"
    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/docs/explorer.js", explorer, methods=["GET"]),
        Mount("/docs/assets", app=StaticFiles(directory=assets), name="docs-assets"),
    ]
