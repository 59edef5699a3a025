"""TLS-SNI routing TCP proxy of the trio Dask Gateway (never decrypts)."""

from .config import ProxySettings, SettingsError, build_parser, load_settings
from .dispatch import SNI_PREFIX, Forward, Reject, cluster_name, decide
from .proxy import SchedulerProxy, serve_scheduler_proxy
from .sockets import open_listeners, open_tcp_socket

__all__ = [
    "SNI_PREFIX",
    "Forward",
    "ProxySettings",
    "Reject",
    "SchedulerProxy",
    "SettingsError",
    "build_parser",
    "cluster_name",
    "decide",
    "load_settings",
    "open_listeners",
    "open_tcp_socket",
    "serve_scheduler_proxy",
]
