"""Thin I/O shell over the official ``kubernetes`` client, and list+watch informers.

Theory of operation
-------------------
The official client blocks, so every call runs in a worker thread
(``trio.to_thread.run_sync``) under a :class:`trio.CapacityLimiter` (at most
``concurrency`` requests in flight) with a per-request timeout. Responses are read as raw
JSON (``_preload_content=False``): the backend works with plain dicts, as its builders
make them. Client exceptions (``ApiException``, urllib3 and socket errors) are translated
once, here, into :class:`KubeError` carrying the HTTP status (0 when the API server could
not be reached) and the server's reason.

An :class:`Informer` keeps an :class:`~.kube_decisions.ObjectCache` of one kind (pods or
Secrets of this gateway instance, by label selector) up to date: it lists once (the caller
waits for that first sync), then watches from the list's resourceVersion with bookmarks.
A watch the server ends (``timeoutSeconds``) is resumed from the last resourceVersion seen;
a 410 Gone (the position expired) makes it list again; other failures back off
exponentially (0.5 s doubling up to 30 s) and resume. Each watch stream is read by a
thread that hands events to the trio thread (``trio.from_thread.run_sync``); cancelling the
watch shuts the response's socket down, which ends the thread. Tasks wait for changes of
one object (:meth:`Informer.wait_change`) or of any (:meth:`Informer.wait_any_change`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import trio

from .kube_decisions import ObjectCache

__all__ = ["Informer", "KubeClient", "KubeConfigError", "KubeError", "load_api_client"]

log = logging.getLogger("dask_gateway.api.kubernetes")

IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_RETRYABLE = frozenset({0, 408, 429, 500, 502, 503, 504})
_KINDS = {"pods": "pod", "secrets": "secret"}


class KubeError(Exception):
    """A Kubernetes API request failed: ``status`` (0: unreachable), ``reason``, message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else f"{reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.status in _RETRYABLE


class KubeConfigError(Exception):
    """No usable Kubernetes configuration (kubeconfig file, context, in-cluster account)."""


def _translate(exc: BaseException) -> KubeError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        reason, message = str(exc.reason or "Error"), ""
        try:
            body = json.loads(exc.body or "")
        except (ValueError, TypeError):
            body = None
        if isinstance(body, dict):
            reason = str(body.get("reason") or reason)
            message = str(body.get("message") or "")
        return KubeError(int(exc.status or 0), reason, message or str(exc.reason or ""))
    return KubeError(0, "Unavailable", f"{type(exc).__name__}: {exc}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    return (ApiException, urllib3.exceptions.HTTPError, OSError)


def load_api_client(
    kubeconfig: str | None, context: str | None, *, pool_size: int = 8
) -> tuple[Any, str | None]:
    """An official ``ApiClient`` and the namespace its configuration implies (or None).

    No ``kubeconfig`` inside a pod (``KUBERNETES_SERVICE_HOST`` set): the in-cluster
    service account, and its namespace. Otherwise the kubeconfig file (``None``: the
    default ``~/.kube/config`` or ``$KUBECONFIG``) and its context's namespace. Blocking;
    raises :class:`KubeConfigError`.
    """
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
            try:
                with open(IN_CLUSTER_NAMESPACE_FILE, encoding="utf-8") as f:
                    namespace: str | None = f.read().strip() or None
            except OSError:
                namespace = None
        else:
            config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=cfg
            )
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = next((c for c in contexts if c.get("name") == context), None) or active
            namespace = ((chosen or {}).get("context") or {}).get("namespace")
    except (config.ConfigException, OSError, ValueError, TypeError) as exc:
        where = kubeconfig or "the default kubeconfig"
        raise KubeConfigError(
            f"cannot load the Kubernetes configuration ({where}): {exc}"
        ) from None
    cfg.connection_pool_maxsize = max(pool_size, 4)
    return client.ApiClient(cfg), namespace


class KubeClient:
    """Pods and Secrets of one namespace, as JSON dicts, through worker threads."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        *,
        concurrency: int = 4,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.core = client.CoreV1Api(api_client)
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self._limiter = trio.CapacityLimiter(concurrency)
        self._watch_limiter = trio.CapacityLimiter(16)
        self.requests = 0

    def _method(self, verb: str, plural: str) -> Callable[..., Any]:
        return getattr(self.core, f"{verb}_namespaced_{_KINDS[plural]}")

    async def _call(self, verb: str, plural: str, *args: Any, **kwargs: Any) -> Any:
        fn = self._method(verb, plural)
        errors = _transport_errors()
        timeout = (self.connect_timeout, self.request_timeout)

        def run() -> Any:
            try:
                resp = fn(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
                data = resp.data
            except errors as exc:
                raise _translate(exc) from None
            try:
                return json.loads(data) if data else None
            except ValueError:
                raise KubeError(
                    int(getattr(resp, "status", 0) or 0), "BadResponse", "the body is not JSON"
                ) from None

        self.requests += 1
        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("create", plural, self.namespace, body)

    async def get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("read", plural, name, self.namespace)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def patch(self, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386)."""
        return await self._call(
            "patch",
            plural,
            name,
            self.namespace,
            patch,
            _content_type="application/merge-patch+json",
        )

    async def delete(
        self, plural: str, name: str, *, grace: float | None = None, uid: str | None = None
    ) -> bool:
        """Delete (background propagation); False if it was already gone. With ``uid``,
        only that incarnation of the object is deleted (409 otherwise, also False)."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace is not None:
            body["gracePeriodSeconds"] = max(0, math.ceil(grace))
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self._call("delete", plural, name, self.namespace, body=body)
        except KubeError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def list(self, plural: str, selector: str) -> tuple[list[dict[str, Any]], str | None]:
        result = await self._call("list", plural, self.namespace, label_selector=selector)
        result = result if isinstance(result, dict) else {}
        items = [i for i in result.get("items") or [] if isinstance(i, dict)]
        kind = _KINDS[plural].capitalize()
        for item in items:  # list items carry no kind; owner references need it
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", "v1")
        return items, (result.get("metadata") or {}).get("resourceVersion")

    async def watch(
        self,
        plural: str,
        selector: str,
        resource_version: str | None,
        timeout_seconds: int,
        on_event: Callable[[dict[str, Any]], None],
    ) -> None:
        """One watch stream, until the server ends it. ``on_event`` runs on the trio thread.

        Raises :class:`KubeError` (410 when ``resource_version`` expired).
        """
        from kubernetes.watch.watch import iter_resp_lines

        fn = self._method("list", plural)
        errors = _transport_errors()
        read_timeout = timeout_seconds + 30.0
        kwargs: dict[str, Any] = {
            "watch": True,
            "label_selector": selector,
            "timeout_seconds": timeout_seconds,
            "allow_watch_bookmarks": True,
            "_preload_content": False,
            "_request_timeout": (self.connect_timeout, read_timeout),
        }
        if resource_version:
            kwargs["resource_version"] = resource_version

        def open_stream() -> Any:
            try:
                return fn(self.namespace, **kwargs)
            except errors as exc:
                raise _translate(exc) from None

        self.requests += 1
        resp = await trio.to_thread.run_sync(open_stream, limiter=self._limiter)
        token = trio.lowlevel.current_trio_token()
        live = [True]

        def deliver(event: dict[str, Any]) -> None:
            if live[0]:
                on_event(event)

        def pump() -> KubeError | None:
            try:
                for line in iter_resp_lines(resp):
                    if not line:
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        return KubeError(200, "BadWatchEvent", "a watch event is not JSON")
                    if not isinstance(event, dict):
                        continue
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        return KubeError(
                            int(status.get("code") or 500),
                            str(status.get("reason") or "Error"),
                            str(status.get("message") or ""),
                        )
                    trio.from_thread.run_sync(deliver, event, trio_token=token)
            except errors as exc:
                if live[0]:
                    return _translate(exc)
            except trio.RunFinishedError:
                pass
            return None

        try:
            outcome = await trio.to_thread.run_sync(
                pump, abandon_on_cancel=True, limiter=self._watch_limiter
            )
        finally:
            live[0] = False
            with contextlib.suppress(Exception):
                resp.shutdown()
            with contextlib.suppress(Exception):
                resp.release_conn()
        if outcome is not None:
            raise outcome


class Informer:
    """A list+watch mirror of one kind of object matching ``selector``."""

    def __init__(
        self,
        client: KubeClient,
        plural: str,
        selector: str,
        *,
        watch_timeout: float = 300.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.client = client
        self.plural = plural
        self.selector = selector
        self.watch_timeout = max(1, math.ceil(watch_timeout))
        self.max_backoff = max_backoff
        self.cache = ObjectCache()
        #: uid -> monotonic time this process first saw the object.
        self.first_seen: dict[str, float] = {}
        self.relists = 0
        self._waiters: dict[str, trio.Event] = {}
        self._any = trio.Event()
        self._generation = 0

    # -- reading

    def get(self, name: str) -> dict[str, Any] | None:
        return self.cache.get(name)

    def values(self) -> list[dict[str, Any]]:
        return self.cache.values()

    async def wait_change(self, name: str) -> None:
        """Return at the next change of object ``name`` (or a relist)."""
        await self._waiters.setdefault(name, trio.Event()).wait()

    async def wait_any_change(self) -> None:
        await self._any.wait()

    # -- writing

    def _notify(self, names: set[str]) -> None:
        if not names:
            return
        now = time.monotonic()
        for name in names:
            obj = self.cache.get(name)
            uid = ((obj or {}).get("metadata") or {}).get("uid")
            if uid:
                self.first_seen.setdefault(uid, now)
            event = self._waiters.pop(name, None)
            if event is not None:
                event.set()
        self._any.set()
        self._any = trio.Event()

    def observe(self, obj: dict[str, Any]) -> None:
        """Write-through of an object the API server just returned (create, patch)."""
        name = (obj.get("metadata") or {}).get("name")
        if self.cache.observe(obj) and isinstance(name, str):
            self._notify({name})

    def forget(self, name: str, uid: str | None = None) -> None:
        if self.cache.forget(name, uid):
            self._notify({name})

    def prune_first_seen(self) -> None:
        live = {(o.get("metadata") or {}).get("uid") for o in self.cache.values()}
        for uid in [u for u in self.first_seen if u not in live]:
            del self.first_seen[uid]

    # -- running

    async def relist(self) -> None:
        items, rv = await self.client.list(self.plural, self.selector)
        self.relists += 1
        self._notify(self.cache.replace(items, rv))

    def _on_event(self, generation: int, event: dict[str, Any]) -> None:
        if generation == self._generation:
            self._notify(self.cache.apply(event))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """List unless :meth:`relist` already ran (errors propagate: the caller cannot
        start without a first sync), report started, then watch forever (see the module
        docstring)."""
        if self.relists == 0:
            await self.relist()
        task_status.started()
        delay = 0.5
        need_list = False
        while True:
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                self._generation += 1
                generation = self._generation
                await self.client.watch(
                    self.plural,
                    self.selector,
                    self.cache.resource_version,
                    self.watch_timeout,
                    lambda event, g=generation: self._on_event(g, event),
                )
                delay = 0.5
            except KubeError as exc:
                if exc.status == 410:
                    log.info("watch of %s expired (%s); listing again", self.plural, exc.message)
                    need_list = True
                    continue
                log.warning("watch of %s failed (%s); retrying in %.1f s", self.plural, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
