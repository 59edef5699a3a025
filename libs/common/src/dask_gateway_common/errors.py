"""The one error type that knows which HTTP status it deserves.

Code anywhere in the gateway raises ``GatewayError(message, status=...)`` when the fault
lies with the peer (bad input, missing auth, unknown cluster) or with an upstream it
depends on. The HTTP layer translates it, in one place, into ``{"error": message}`` with
that status. Anything else that escapes a handler is a bug: it is logged with a request id
and the user sees a generic 500.
"""

from __future__ import annotations

from collections.abc import Iterable


class GatewayError(Exception):
    """An error whose message is safe to show to the peer, with its HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = list(headers)

    def __repr__(self) -> str:
        return f"GatewayError({self.message!r}, status={self.status})"
