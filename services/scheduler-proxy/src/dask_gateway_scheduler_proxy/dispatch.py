"""What to do with a connection, given what its first bytes said (pure, no I/O).

The proxy reads until the sans-IO parser gives an answer, then asks :func:`decide`:

* a ClientHello whose SNI is ``daskgateway-<name>`` with an SNI route for ``<name>`` →
  :class:`Forward` to the scheduler;
* a ClientHello for an unknown cluster → :class:`Reject` with the ``unrecognized_name``
  alert;
* not TLS, or TLS whose SNI is not ``daskgateway-...`` (no name, or another host name) →
  :class:`Forward` to the HTTP(S) side when one is configured (one public port for both,
  like upstream, including HTTPS the web proxy terminates); without one, a silent
  :class:`Reject` for non-TLS and the ``unrecognized_name`` alert for TLS.

Routes are looked up here, at connect time only, so later route changes never touch an
established connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from dask_gateway_common.sni import UNRECOGNIZED_NAME, ClientHello, NotTLS

__all__ = [
    "SNI_PREFIX",
    "Forward",
    "Reject",
    "cluster_name",
    "decide",
]

SNI_PREFIX: Final = "daskgateway-"

Address = tuple[str, int]
Lookup = Callable[[str], Address | None]


@dataclass(frozen=True, slots=True)
class Forward:
    """Connect to ``address``, replay the bytes read so far, then relay both ways."""

    address: Address
    kind: Literal["scheduler", "http"]
    cluster: str | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    """Close the connection, first sending ``alert`` (a TLS alert description) if set.

    ``reason`` is a short fixed label for metrics and logs.
    """

    reason: str
    alert: int | None = None


REJECT_NOT_TLS: Final = Reject("not_tls")
REJECT_NO_SNI: Final = Reject("no_sni", UNRECOGNIZED_NAME)
REJECT_BAD_PREFIX: Final = Reject("sni_without_prefix", UNRECOGNIZED_NAME)
REJECT_UNKNOWN: Final = Reject("unknown_cluster", UNRECOGNIZED_NAME)


def cluster_name(sni: str | None) -> str | None:
    """The cluster name in an SNI ``daskgateway-<name>``, or ``None`` if it is not one."""
    if sni is None or not sni.startswith(SNI_PREFIX) or len(sni) == len(SNI_PREFIX):
        return None
    return sni[len(SNI_PREFIX) :]


def decide(
    result: ClientHello | NotTLS, lookup: Lookup, http_forward: Address | None
) -> Forward | Reject:
    """Decide the fate of one connection (see the module docstring)."""
    if isinstance(result, NotTLS):
        if http_forward is None:
            return REJECT_NOT_TLS
        return Forward(http_forward, "http")
    name = cluster_name(result.sni)
    if name is None:
        if http_forward is not None:
            return Forward(http_forward, "http")
        return REJECT_NO_SNI if result.sni is None else REJECT_BAD_PREFIX
    address = lookup(name)
    if address is None:
        return REJECT_UNKNOWN
    return Forward(address, "scheduler", name)
