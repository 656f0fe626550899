"""Errors the REST routes raise; the app's handlers turn them into the envelope.

The tree::

    ApiError(code, message, details)   any stable error code from storage/domain/envelope.py
    ├── Unauthorized                   no or bad credentials (401)
    └── Forbidden                      credentials lack the scope or role (403)

Storage errors (NotFound, Conflict, InvalidInput) are mapped in api/app.py.
"""

from __future__ import annotations

from typing import Any

from storage.domain.envelope import FieldError


class ApiError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


class Unauthorized(ApiError):
    def __init__(self, message: str = "authentication required") -> None:
        super().__init__("unauthorized", message)


class Forbidden(ApiError):
    def __init__(self, message: str = "not allowed") -> None:
        super().__init__("forbidden", message)


def invalid_body(*errors: FieldError) -> ApiError:
    """``validation_error`` for a body that decoded but breaks a rule."""
    return ApiError("validation_error", "request body is not valid", list(errors))


def invalid_query(*errors: FieldError) -> ApiError:
    """``validation_error`` for a query parameter out of range."""
    return ApiError("validation_error", "query parameter out of range", list(errors))
