"""The API's one error shape: every refusal is JSON {"error": {"code", "field", "message"}} with an HTTP status.

A code names what went wrong (`queue_full`, `out_of_range`, `bad_origin`, ...) so a client can act on it without
parsing the message; `field` is the request field at fault, or None when the request as a whole is refused.
"""

from __future__ import annotations


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, a `code`, the `field` at fault and a message."""

    def __init__(self, status: int, code: str, field: str | None, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.field, self.message = status, code, field, message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "field": self.field, "message": self.message}}


def out_of_range(field: str, allowed: str, got: object) -> RequestError:
    return RequestError(422, "out_of_range", field, f"{field}: must be {allowed}, got {got}")


def internal_error(err: BaseException) -> RequestError:
    """What the server failed at, as a 500 the client can read (the traceback goes to the server's log)."""
    return RequestError(500, "internal_error", None, f"generation failed: {type(err).__name__}: {err}")
