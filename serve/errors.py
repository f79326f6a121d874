"""Errors of the server, each with the HTTP status it is answered with."""

from __future__ import annotations

from sdrt.engines.errors import SdrtError
from sdrt.runtime.errors import CancelledError, InvalidInputError


class ServeError(SdrtError):
    status = 500


class RequestTooLargeError(InvalidInputError):
    """A request body over the server's --max-body-mb."""

    status = 413


class UnauthorizedError(ServeError):
    """A request without the server's API key (Authorization: Bearer KEY)."""

    status = 401


class UnknownModelError(ServeError):
    status = 404


class QueueFullError(ServeError):
    """The waiting queue is at its bound (--max-queue): answered 429 with Retry-After."""

    status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ClientGoneError(CancelledError):
    """The client disconnected: its generation stopped at the next step."""
