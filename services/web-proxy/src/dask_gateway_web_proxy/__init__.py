"""The Dask Gateway web proxy: HTTP/1.1 reverse proxy by path prefix, websockets passed
through, routes from the API's route feed.

Modules: ``routing`` (pure: trie, target and header rewriting), ``pool`` (upstream
keep-alive pool), ``proxy`` (the I/O shell: ``serve_web_proxy``), ``config`` (typed
settings), ``main`` (the ``dask-gateway-web-proxy`` console script).
"""

from .config import WebProxySettings, load_settings
from .pool import UpstreamPool
from .proxy import ProxyTimeouts, WebProxy, serve_web_proxy
from .routing import ProxyRoute, Router, Target, parse_target

__all__ = [
    "ProxyRoute",
    "ProxyTimeouts",
    "Router",
    "Target",
    "UpstreamPool",
    "WebProxy",
    "WebProxySettings",
    "load_settings",
    "parse_target",
    "serve_web_proxy",
]
