"""Logging setup shared by the services, and a helper that keeps secrets out of logs.

``setup_logging`` installs exactly one stderr handler on the named logger (calling it again
only changes the level), so services and tests can call it freely. Records still propagate
to the root logger (which has no handler unless someone configured one), so pytest's
``caplog`` keeps working. Tokens and keys must
never be logged; when a message might embed one (a URL with a query, a peer's header),
pass it through ``redact(text, *secrets)`` first.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOG_FORMAT", "REDACTED", "redact", "setup_logging"]

LOG_FORMAT = "[%(asctime)s %(levelname).1s %(name)s] %(message)s"
REDACTED = "[redacted]"
_HANDLER_MARK = "_dask_gateway_handler"


def setup_logging(level: str = "INFO", name: str = "dask_gateway") -> None:
    """Send ``name``'s records to stderr at ``level``; idempotent.

    Raises ``ValueError`` for an unknown level name.
    """
    numeric = logging.getLevelName(str(level).strip().upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logger = logging.getLogger(name)
    logger.setLevel(numeric)
    for handler in logger.handlers:
        if getattr(handler, _HANDLER_MARK, False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)


def redact(text: str, *secrets: str | bytes | None) -> str:
    """Replace every occurrence of each non-empty secret in ``text`` with ``[redacted]``.

    Longer secrets are replaced first so a secret containing another is fully hidden.
    """
    values: list[str] = []
    for secret in secrets:
        if isinstance(secret, bytes):
            secret = secret.decode("utf-8", "replace")
        if secret:
            values.append(secret)
    for secret in sorted(values, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text
