"""Typed refusals: every way ResGov says no, with the fields a client needs."""

from __future__ import annotations

from typing import Any


class ResGovError(Exception):
    """A refusal or failure that maps to one HTTP status and one JSON error body.

    ``type`` and ``reason`` are stable identifiers clients can branch on; ``message``
    is for humans. ``extra`` fields are added to the ``error`` object as they are.
    """

    status: int = 400
    type: str = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        type: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if type is not None:
            self.type = type
        if status is not None:
            self.status = status
        self.reason = reason or self.type
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The ``error`` object of the JSON body."""
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        error.update(self.extra)
        error["reason"] = self.reason
        return error


class BadRequest(ResGovError):
    """Malformed request: invalid JSON or wrong types (400)."""

    status = 400
    type = "invalid_request_error"


class InvalidValue(ResGovError):
    """Well-formed request with values ResGov cannot accept (422)."""

    status = 422
    type = "invalid_value"


class Unauthorized(ResGovError):
    """Missing, unknown, expired or revoked key (401)."""

    status = 401
    type = "authentication_error"


class Forbidden(ResGovError):
    """A policy refusal (403); ``type`` names which one."""

    status = 403
    type = "forbidden"


class BudgetExceeded(Forbidden):
    """The worst case of the call does not fit a budget that covers it."""

    type = "budget_exceeded"


class NotFound(ResGovError):
    """Object not found, or not this org's (404)."""

    status = 404
    type = "not_found"


class PayloadTooLarge(ResGovError):
    """Request body above the configured limit (413)."""

    status = 413
    type = "request_too_large"


class StoreUnavailable(ResGovError):
    """The ledger cannot be reached and the policy says deny (503)."""

    status = 503
    type = "store_unavailable"


class UpstreamFailure(ResGovError):
    """The upstream could not be reached or timed out (502/504)."""

    status = 502
    type = "upstream_error"
