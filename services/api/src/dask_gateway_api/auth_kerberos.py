"""Kerberos (SPNEGO) authentication (spec §2.2), with the ``gssapi`` binding.

Theory of operation
-------------------
A request without credentials gets 401 ``WWW-Authenticate: Negotiate``. The official client
then obtains a service ticket for ``HTTP@<host of the gateway address>`` and retries with
``Authorization: Negotiate <base64 GSS token>``. We make exactly one GSS *accept* step with
that token against the keytab:

* the acceptor credentials come from the configured keytab through the credential-store
  extension (``store={"keytab": path}``), so the process environment (``KRB5_KTNAME``) is
  left alone;
* ``service_name`` ``HTTP`` (the default) accepts a ticket for any principal of the keytab
  and then requires its service part to be ``HTTP`` -- host names behind load balancers
  rarely match ``gethostname()``; a full ``HTTP@host`` binds the acceptor to ``HTTP/host``;
* the context must be complete after that one step (a Kerberos token always is), the user
  is the client principal without ``@REALM``;
* the step's output token (the mutual-authentication AP-REP) is kept for this request in a
  weak map and added by :meth:`KerberosAuthenticator.pre_response` as
  ``WWW-Authenticate: Negotiate <token>`` -- the official client refuses a response
  without it. If the handler fails, the entry just disappears with the request.

GSS calls block (keytab reads, replay cache), so they run in a worker thread. A header
that is not ``Negotiate <base64>`` means "not authenticated" (401); every GSS failure --
a garbled or foreign token, a ticket for a principal the keytab lacks, an unreadable
keytab, a replay -- is 500 ``Error during kerberos authentication`` with the GSS message in
the log (never the token).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import weakref
from typing import Any

import trio

from dask_gateway_common.errors import GatewayError
from dask_gateway_common.http import Request, Response
from dask_gateway_common.tokens import parse_authorization

from .auth import Authenticator, User

__all__ = [
    "KERBEROS_FAILURE",
    "KerberosAuthenticator",
    "KerberosUnavailable",
    "negotiate_token_from_header",
    "service_of_principal",
    "user_from_principal",
]

log = logging.getLogger("dask_gateway.api.auth")

KERBEROS_FAILURE = "Error during kerberos authentication"
#: Larger Negotiate tokens are refused unread (tickets with big PACs stay far below this).
MAX_TOKEN_BYTES = 64 * 1024


class KerberosUnavailable(RuntimeError):
    """The ``gssapi`` package (or its Kerberos library) cannot be loaded."""


class _GSSFailure(Exception):
    """A GSS accept step failed; the message is for the log only."""


# --- pure parts -------------------------------------------------------------------------


def negotiate_token_from_header(value: str | None) -> bytes | None:
    """The decoded token of ``Authorization: Negotiate <base64>``, or ``None``. Never raises."""
    parsed = parse_authorization(value)
    if parsed is None or parsed[0] != "negotiate":
        return None
    text = parsed[1]
    if len(text) > MAX_TOKEN_BYTES * 4 // 3 + 4:
        return None
    try:
        token = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    return token or None


def user_from_principal(principal: str) -> str:
    """``alice@EXAMPLE.ORG`` → ``alice`` (the part before the first ``@``)."""
    return principal.split("@", 1)[0]


def service_of_principal(principal: str) -> str:
    """``HTTP/host@REALM`` → ``HTTP``."""
    return principal.split("@", 1)[0].split("/", 1)[0]


# --- the I/O shell ----------------------------------------------------------------------


def _load_gssapi() -> Any:
    try:
        import gssapi
    except ImportError as exc:
        raise KerberosUnavailable(
            f"auth.type kerberos needs the Python package 'gssapi' (pip install gssapi): {exc}"
        ) from None
    return gssapi


class KerberosAuthenticator(Authenticator):
    """SPNEGO against a keytab (see the module docstring)."""

    scheme = "Negotiate"

    def __init__(self, keytab: str, service_name: str = "HTTP") -> None:
        """Raises :class:`KerberosUnavailable` without ``gssapi``, ``OSError`` if the keytab
        cannot be read, ``ValueError`` for a bad ``service_name``."""
        self._gssapi = _load_gssapi()
        if not service_name.strip():
            raise ValueError("the Kerberos service name must not be empty")
        with open(keytab, "rb"):
            pass  # readable now; it is read again on every accept (so it may be rotated)
        self.keytab = os.path.abspath(keytab)
        self.service_name = service_name.strip()
        self._acceptor_name = None
        if "@" in self.service_name:
            gssapi = self._gssapi
            self._acceptor_name = gssapi.Name(
                self.service_name, name_type=gssapi.NameType.hostbased_service
            )
        self._server_tokens: weakref.WeakKeyDictionary[Request, str] = weakref.WeakKeyDictionary()

    def _accept(self, token: bytes) -> tuple[str, bytes | None]:
        """One GSS accept step (blocking): ``(client principal, output token)``."""
        gssapi = self._gssapi
        try:
            creds = gssapi.Credentials(
                name=self._acceptor_name, usage="accept", store={"keytab": self.keytab}
            )
            context = gssapi.SecurityContext(creds=creds, usage="accept")
            out = context.step(token)
            if not context.complete:
                raise _GSSFailure("the client's token needs more than one round trip")
            principal = str(context.initiator_name)
            target = str(context.target_name) if context.target_name is not None else ""
        except (gssapi.exceptions.GSSError, gssapi.exceptions.GeneralError) as exc:
            raise _GSSFailure(str(exc).strip() or type(exc).__name__) from None
        if self._acceptor_name is None and service_of_principal(target) != self.service_name:
            raise _GSSFailure(
                f"ticket for {target!r}, which is not a {self.service_name!r} principal"
            )
        return principal, out

    async def authenticate(self, request: Request) -> User | None:
        token = negotiate_token_from_header(request.headers.get("Authorization"))
        if token is None:
            return None
        try:
            principal, out = await trio.to_thread.run_sync(self._accept, token)
        except _GSSFailure as exc:
            log.error("Kerberos failure (request %s): %s", request.request_id, exc)
            raise GatewayError(KERBEROS_FAILURE, status=500) from None
        name = user_from_principal(principal)
        if not name:
            log.error("Kerberos failure (request %s): empty client principal", request.request_id)
            raise GatewayError(KERBEROS_FAILURE, status=500)
        if out:
            self._server_tokens[request] = base64.b64encode(out).decode("ascii")
        return User(name=name)

    def pre_response(self, request: Request, user: User, response: Response) -> None:
        token = self._server_tokens.pop(request, None)
        if token:
            response.headers.append(("WWW-Authenticate", f"Negotiate {token}"))
