"""Errors raised by the storage core.

The tree::

    StorageError
    ├── NotFound            a row does not exist in the caller's church
    ├── Conflict            a unique rule would be broken (e.g. the same phone twice)
    │   └── OptedOut        the member opted out: no text of ours may reach them
    ├── InvalidPhone        a phone number that is not a valid number
    └── InvalidInput        a value the domain rejects (field, message)

They carry data and no HTTP knowledge; the edges (routes, endpoints) turn
them into statuses and error codes.
"""

from __future__ import annotations


class StorageError(Exception):
    pass


class NotFound(StorageError):
    def __init__(self, kind: str) -> None:
        super().__init__(f"{kind} not found")
        self.kind = kind


class Conflict(StorageError):
    code = "conflict"
    """The stable error code the edges answer with."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class OptedOut(Conflict):
    code = "opted_out"

    def __init__(self) -> None:
        super().__init__(
            "the member opted out of texts; only they can opt back in (by texting START)"
        )


class InvalidInput(StorageError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidPhone(InvalidInput):
    def __init__(self, raw: str, reason: str) -> None:
        super().__init__("phone", reason)
        self.raw = raw
