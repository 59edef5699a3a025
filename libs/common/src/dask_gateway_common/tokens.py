"""Authorization header parsing and constant-time token comparison.

Everything here takes untrusted input from a peer and must never raise: a header with no
space, an empty value, bad base64 or non-text bytes all turn into ``None`` / ``False``.
Secrets are compared with :func:`hmac.compare_digest` on UTF-8 bytes, never with ``==``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets

__all__ = [
    "TOKEN_SCHEMES",
    "check_token_header",
    "decode_basic",
    "new_token",
    "parse_authorization",
    "tokens_equal",
]

#: Schemes accepted by :func:`check_token_header` (``token`` as upstream, ``bearer`` too).
TOKEN_SCHEMES = frozenset({"token", "bearer"})


def parse_authorization(value: str | None) -> tuple[str, str] | None:
    """Split an ``Authorization`` header into ``(scheme lowercased, credentials stripped)``.

    Returns ``None`` when the header is missing, empty, has no credentials after the
    scheme, or is not text. Never raises.
    """
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value:
        return None
    parts = value.split(None, 1)
    if len(parts) != 2:
        return None
    scheme, credentials = parts[0].lower(), parts[1].strip()
    if not credentials or not scheme.isascii() or not scheme.isprintable():
        return None
    return scheme, credentials


def _as_bytes(value: str | bytes) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            return None
    return None


def tokens_equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets in constant time; ``False`` on any type or encoding problem."""
    a_bytes, b_bytes = _as_bytes(a), _as_bytes(b)
    if a_bytes is None or b_bytes is None:
        return False
    return hmac.compare_digest(a_bytes, b_bytes)


def check_token_header(value: str | None, expected: str) -> bool:
    """True iff ``value`` is ``token <expected>`` or ``Bearer <expected>`` (any case scheme).

    An empty ``expected`` token never matches, so a misconfigured service fails closed.
    """
    if not expected:
        return False
    parsed = parse_authorization(value)
    if parsed is None:
        return False
    scheme, credentials = parsed
    if scheme not in TOKEN_SCHEMES:
        return False
    return tokens_equal(credentials, expected)


def decode_basic(credentials: str) -> tuple[str, str] | None:
    """Decode HTTP Basic credentials into ``(user, password)``.

    The base64 payload is decoded as latin-1 (what the official client encodes with). The
    user is the part before the *first* ``:``, so passwords may contain colons. Returns
    ``None`` on bad base64 or a payload without a colon.
    """
    if not isinstance(credentials, str):
        return None
    try:
        raw = base64.b64decode(credentials.strip().encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    text = raw.decode("latin-1")
    user, sep, password = text.partition(":")
    if not sep:
        return None
    return user, password


def new_token() -> str:
    """A fresh random token: 32 random bytes as 64 hex characters."""
    return secrets.token_hex(32)
