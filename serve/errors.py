"""Errors as data: every refusal is an ``ApiError`` answered as ``{"error": {"code", "message"}}``."""

from __future__ import annotations


class ApiError(Exception):
    """A request the service refuses: HTTP status, a stable machine-readable code, a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}

    def named(self, field: str) -> ApiError:
        """The same error with the input it concerns named first (``images[2]: not an image``)."""
        return ApiError(self.status, self.code, f"{field}: {self.message}", self.headers)
