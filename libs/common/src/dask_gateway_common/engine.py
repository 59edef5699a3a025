"""The relay engine: one thread per process that moves bytes between sockets (Linux).

Theory of operation
-------------------
For small messages a proxy's cost is scheduling, not copying: in trio each ``await`` that
parks a task is a trip through the run loop plus an ``epoll_ctl`` (trio re-arms a one-shot
registration per wait), 25-35 µs of CPU per proxied message. The engine is a daemon thread
running an **edge-triggered epoll loop**: each fd is registered once (no ``epoll_ctl`` per
message), and a readable event costs one ``recv_into`` + one ``send`` and a few Python
statements. It is not a trio task on purpose: driven from trio (``wait_readable`` on the
epoll fd) one message cost 110 µs instead of 35-45 µs, because every wake-up went through
trio's run loop and its re-arm.

What runs inside (every method below runs in the engine thread unless marked thread-safe):

* **Handlers.** ``watch(fd, handler)`` registers an fd (IN|OUT|RDHUP, edge-triggered) and
  routes its events to ``handler.on_event(fd, events)``; ``rebind`` hands a watched fd to
  another handler without touching epoll; ``again(handler)`` asks for ``handler.step()``
  right after this batch (more work, no new edge to wait for). An exception from a handler
  goes to its ``abort(error)``, so one broken connection never stops the others.
* **Relays** (``start_relay``): two directions src → dst, each with two readiness flags,
  ``src_ready`` (set by an IN/RDHUP/HUP/ERR event) and ``dst_ok`` (set by OUT, cleared only
  by EAGAIN), so no edge is lost. ``src_ready`` is cleared by EAGAIN, or by a short read (the
  socket was drained, new data raises a new edge), which saves a failing ``recv`` per small
  message; but never by a short read once an event reported RDHUP/HUP/ERR, because
  ``recv`` returns the data in front of a queued FIN (or RST) without it, and that FIN
  raises no further edge. Reads go into ONE buffer owned by the engine; only the unsent
  tail of a partial send is copied out (``pending``), and reading that direction stops
  until it drains (backpressure: memory per connection is bounded). A direction moves at
  most ``_BURST`` chunks per turn, then goes to the back of the line.
* **Bulk.** A read of ≥ ``_BULK_BYTES`` marks a bulk stream: the direction lifts
  ``TCP_NOTSENT_LOWAT`` on its destination (trio sets 16 KiB on its SocketStreams, which
  made a bulk writer queue only that much, and the proxied download cost ~1.6x the CPU
  per GiB of the upload) and, in ``MODE_AUTO``, switches to ``os.splice`` through its own
  1 MiB pipe. Small-message connections never pay the two pipe fds. While a bulk
  direction waits for its destination to drain, its source is re-registered without IN
  (``EPOLL_CTL_MOD``, twice per stall): a sender raises an edge per segment, and those
  edges were 3 in 5 of a proxied download's wake-ups, each one Python work for nothing.
* **Timers** (``call_later``; cancelled ones are dropped when they reach the head of the
  heap or outnumber the live ones) and **calls from other threads** (``call_soon``,
  thread-safe: a deque plus an eventfd that wakes the loop).
* ``on_bytes(direction, n)`` callbacks run in the engine thread: they must be thread-safe
  and quick (a ``prometheus_client`` counter's ``inc`` is both).
* If the loop itself dies (a bug), every handler is aborted with the error, pending calls
  get their ``fail`` callback, and ``get_engine()`` starts a new engine on the next call.
  A forked child starts its own engine.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Final

if sys.platform == "linux":
    import fcntl

__all__ = [
    "ENGINE_AVAILABLE",
    "MODE_ALWAYS",
    "MODE_AUTO",
    "MODE_NEVER",
    "SPLICE_AVAILABLE",
    "Engine",
    "EngineCrashed",
    "Handler",
    "OnBytes",
    "Relay",
    "Timer",
    "get_engine",
]

log = logging.getLogger("dask_gateway.engine")

OnBytes = Callable[[str, int], None]
OnDone = Callable[[BaseException | None], None]

SPLICE_AVAILABLE: Final = sys.platform == "linux" and hasattr(os, "splice")
ENGINE_AVAILABLE: Final = hasattr(select, "epoll") and hasattr(os, "eventfd")

MODE_NEVER: Final = 0  # always recv_into + send
MODE_AUTO: Final = 1  # switch a direction to splice once it streams bulk data
MODE_ALWAYS: Final = 2  # splice from the start

_BUFFER_SIZE: Final = 1 << 18  # the engine's single read buffer
_BURST: Final = 16  # chunks a direction moves before letting others run
_BULK_BYTES: Final = 1 << 16  # a single read this big means a bulk stream
_SPLICE_CHUNK: Final = 1 << 20
_PIPE_SIZE: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031
_TCP_NOTSENT_LOWAT: Final = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_SPLICE_FLAGS: Final = (
    (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if SPLICE_AVAILABLE else 0  # type: ignore[attr-defined]
)

# epoll flags (the module must still import where select has no epoll, e.g. macOS)
_IN, _OUT, _RDHUP, _HUP, _ERR, _ET = (
    getattr(select, name, 0)
    for name in ("EPOLLIN", "EPOLLOUT", "EPOLLRDHUP", "EPOLLHUP", "EPOLLERR", "EPOLLET")
)
EV_READ: Final = _IN | _RDHUP | _HUP | _ERR
EV_WRITE: Final = _OUT | _HUP | _ERR
EV_HUP: Final = _RDHUP | _HUP | _ERR
_EV_REGISTER: Final = _IN | _OUT | _RDHUP | _ET
_EV_PAUSED: Final = _OUT | _RDHUP | _ET  # a bulk source while its destination is full


def lift_notsent_lowat(sock: socket.socket) -> None:
    """Reset ``TCP_NOTSENT_LOWAT`` to the system default (no limit) on a TCP socket."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, 0)
        except OSError:
            pass


def open_pipe() -> tuple[int, int]:
    """A non-blocking pipe of ``_PIPE_SIZE`` (or the system's maximum) for splicing."""
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:  # capped by /proc/sys/fs/pipe-max-size or the user's pipe budget
        pass
    return pipe_r, pipe_w


class EngineCrashed(RuntimeError):
    """The engine loop died (a bug); what it was serving is aborted with this error."""


class Handler:
    """Receives the events of the fds it watches; every method runs in the engine thread."""

    __slots__ = ()

    def on_event(self, fd: int, events: int) -> None:
        raise NotImplementedError

    def step(self) -> None:
        """Called after ``Engine.again(self)``."""

    def abort(self, error: BaseException | None) -> None:
        """Give up: release everything (``error`` is None for an ordinary shutdown)."""
        raise NotImplementedError


class Timer:
    """A pending ``Engine.call_later``; ``cancel()`` it from the engine thread."""

    __slots__ = ("fn", "_engine")

    def __init__(self, fn: Callable[[], None], engine: Engine) -> None:
        self.fn: Callable[[], None] | None = fn
        self._engine = engine

    def cancel(self) -> None:
        if self.fn is not None:
            self.fn = None
            self._engine._timer_cancelled()


# ---- relays ----------------------------------------------------------------------------------


class _Direction:
    """One direction src → dst of a relay."""

    __slots__ = (
        "src",
        "dst",
        "src_fd",
        "dst_fd",
        "name",
        "pending",
        "in_pipe",
        "pipe_r",
        "pipe_w",
        "mode",
        "src_ready",
        "src_hup",
        "dst_ok",
        "eof",
        "shut",
        "bulk",
        "paused",
        "modify",
    )

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        name: str,
        prefix: bytes,
        mode: int,
        modify: Callable[[int, int], None],
    ) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.name = name
        self.pending: memoryview | None = memoryview(prefix) if prefix else None
        self.in_pipe = 0
        self.pipe_r = -1
        self.pipe_w = -1
        self.mode = mode
        self.src_ready = True  # optimistic until EAGAIN: costs one syscall, loses no edge
        self.src_hup = False  # an event reported RDHUP/HUP/ERR on src (sticky)
        self.dst_ok = True
        self.eof = False
        self.shut = False
        self.bulk = False
        self.paused = False
        self.modify = modify

    def pump(self, buf: bytearray, view: memoryview, on_bytes: OnBytes | None) -> bool:
        """Move up to _BURST chunks; True if there may be more to do right away."""
        for _ in range(_BURST):
            if self.pending is not None:
                if not self.dst_ok:
                    if self.bulk and not self.paused:
                        self._pause()
                    return False
                try:
                    sent = self.dst.send(self.pending)
                except BlockingIOError:
                    self.dst_ok = False
                    return False
                self.pending = self.pending[sent:] if sent < len(self.pending) else None
                continue
            if self.in_pipe:
                if not self.dst_ok:
                    if not self.paused:
                        self._pause()
                    return False
                try:
                    self.in_pipe -= os.splice(  # type: ignore[attr-defined]
                        self.pipe_r, self.dst_fd, self.in_pipe, flags=_SPLICE_FLAGS
                    )
                except BlockingIOError:
                    self.dst_ok = False
                    return False
                continue
            if self.paused:
                self._resume()
            if self.eof:
                if not self.shut:
                    self.shut = True
                    self.dst.shutdown(socket.SHUT_WR)
                return False
            if not self.src_ready:
                return False
            if self.pipe_w < 0 and self.mode == MODE_ALWAYS:
                self._start_splicing()
            if self.pipe_w >= 0:
                try:
                    n = os.splice(  # type: ignore[attr-defined]
                        self.src_fd, self.pipe_w, _SPLICE_CHUNK, flags=_SPLICE_FLAGS
                    )
                except BlockingIOError:
                    self.src_ready = False
                    return False
                self.in_pipe = n
            else:
                try:
                    n = self.src.recv_into(buf)
                except BlockingIOError:
                    self.src_ready = False
                    return False
                if n < len(buf) and not self.src_hup:
                    # A short read drained the socket, and data arriving later raises a
                    # new edge: skipping the recv that would only say EAGAIN saves a
                    # syscall and an exception per small message. Not once a FIN/RST has
                    # been reported: recv stops short of a queued FIN (it is returned by
                    # the next call) and that FIN will raise no further edge.
                    self.src_ready = False
                if n:
                    try:
                        sent = self.dst.send(view[:n])
                    except BlockingIOError:
                        sent = 0
                        self.dst_ok = False
                    if sent < n:  # keep the tail: the shared buffer is reused next read
                        self.pending = memoryview(bytes(view[sent:n]))
            if n == 0:
                self.eof = True
                continue
            if n >= _BULK_BYTES and not self.bulk:
                self._go_bulk()
            if on_bytes is not None:
                on_bytes(self.name, n)
        return True

    def _pause(self) -> None:
        # Stop IN edges from src while dst is full: each one would wake the loop for
        # nothing (a bulk sender raises one per segment). OUT (src is the other
        # direction's destination) and RDHUP stay.
        self.paused = True
        self.modify(self.src_fd, _EV_PAUSED)

    def _resume(self) -> None:
        self.paused = False
        self.src_ready = True  # edges were off: look once (MOD also re-reports readiness)
        self.modify(self.src_fd, _EV_REGISTER)

    def _go_bulk(self) -> None:
        self.bulk = True
        lift_notsent_lowat(self.dst)
        if self.mode == MODE_AUTO:
            self._start_splicing()

    def _start_splicing(self) -> None:
        self.mode = MODE_ALWAYS
        try:
            self.pipe_r, self.pipe_w = open_pipe()
        except OSError:  # e.g. out of fds: keep copying
            self.mode = MODE_NEVER

    def close_pipe(self) -> None:
        if self.pipe_w >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1


class Relay(Handler):
    """A two-way relay a ("up" = a → b) ↔ b ("down") inside the engine; see the module doc.

    ``on_done(error)`` is called once, in the engine thread, when both directions have
    ended (error None), a peer reset or vanished (None), or a bug or ``on_bytes`` failed
    (the exception). The sockets are then no longer watched; closing them is the caller's.
    """

    __slots__ = ("engine", "fd_a", "fd_b", "up", "down", "on_bytes", "on_done", "done")

    def __init__(
        self,
        engine: Engine,
        a: socket.socket,
        b: socket.socket,
        prefix_to_b: bytes,
        prefix_to_a: bytes,
        on_bytes: OnBytes | None,
        mode: int,
        on_done: OnDone,
    ) -> None:
        self.engine = engine
        self.fd_a = a.fileno()
        self.fd_b = b.fileno()
        modify = engine.modify
        self.up = _Direction(a, b, "up", prefix_to_b, mode, modify)
        self.down = _Direction(b, a, "down", prefix_to_a, mode, modify)
        self.on_bytes = on_bytes
        self.on_done = on_done
        self.done = False

    def on_event(self, fd: int, events: int) -> None:
        reader, writer = (self.up, self.down) if fd == self.fd_a else (self.down, self.up)
        if events & EV_READ:
            reader.src_ready = True
            if events & EV_HUP:
                reader.src_hup = True
        if events & EV_WRITE:
            writer.dst_ok = True
        self.step()

    def step(self) -> None:
        if self.done:
            return
        engine = self.engine
        try:
            more = self.up.pump(engine.buf, engine.view, self.on_bytes)
            more = self.down.pump(engine.buf, engine.view, self.on_bytes) or more
        except OSError:  # reset, broken pipe, ...: the connection is over
            self.abort(None)
            return
        except Exception as exc:  # a bug, or on_bytes raised: fail this relay only
            self.abort(exc)
            return
        if self.up.shut and self.down.shut:
            self.abort(None)
        elif more:
            engine.again(self)

    def abort(self, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        self.engine.unwatch(self.fd_a, self)
        self.engine.unwatch(self.fd_b, self)
        self.up.close_pipe()
        self.down.close_pipe()
        self.on_done(error)


# ---- the engine ------------------------------------------------------------------------------


class Engine:
    """The relay thread: an edge-triggered epoll loop over every watched socket."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.dead = False
        self.buf = bytearray(_BUFFER_SIZE)
        self.view = memoryview(self.buf)
        self._lock = threading.Lock()
        self._calls: collections.deque[tuple[Callable[[], None], OnDone | None]] = (
            collections.deque()
        )
        self._handlers: dict[int, Handler] = {}
        self._again: list[Handler] = []
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  # cancelled timers still in the heap
        self._seq = itertools.count()
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # type: ignore[attr-defined]
        self._epoll.register(self._wake, _IN)
        self._thread = threading.Thread(target=self._run, name="relay-engine", daemon=True)
        self._thread.start()

    # -- from any thread -------------------------------------------------------------------
    def call_soon(self, fn: Callable[[], None], fail: OnDone | None = None) -> None:
        """Run ``fn()`` in the engine thread (thread-safe). If the engine is dead, or dies
        before running it, ``fail(error)`` is called instead (in whichever thread notices),
        or, without ``fail``, RuntimeError is raised here."""
        with self._lock:
            if not self.dead:
                self._calls.append((fn, fail))
                os.eventfd_write(self._wake, 1)  # type: ignore[attr-defined]
                return
        error = RuntimeError("the relay engine has stopped")
        if fail is None:
            raise error
        fail(error)

    # -- engine thread only -----------------------------------------------------------------
    def watch(self, fd: int, handler: Handler) -> None:
        """Register ``fd`` (IN|OUT|RDHUP, edge-triggered) for ``handler``. A socket that is
        already writable (any connected one) reports an event right away."""
        self._epoll.register(fd, _EV_REGISTER)
        self._handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        """Change the event mask of a watched fd (stays edge-triggered if ``mask`` is)."""
        self._epoll.modify(fd, mask)

    def rebind(self, fd: int, handler: Handler) -> None:
        """Route the events of an already watched ``fd`` to ``handler``."""
        if fd not in self._handlers:
            raise KeyError(fd)
        self._handlers[fd] = handler

    def unwatch(self, fd: int, handler: Handler | None = None) -> None:
        """Stop watching ``fd`` (only if it belongs to ``handler``, when given)."""
        current = self._handlers.get(fd)
        if current is None or (handler is not None and current is not handler):
            return
        del self._handlers[fd]
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def again(self, handler: Handler) -> None:
        """Call ``handler.step()`` after the current batch of events."""
        self._again.append(handler)

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(fn, self)
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), timer))
        return timer

    def _timer_cancelled(self) -> None:
        # Cancelled timers stay in the heap until due (a hello deadline is 10 s, and most
        # are cancelled within a millisecond): drop them once they are the majority.
        self._cancelled += 1
        if self._cancelled > 1024 and 2 * self._cancelled > len(self._timers):
            self._timers[:] = [entry for entry in self._timers if entry[2].fn is not None]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def start_relay(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        on_done: OnDone,
        prefix_to_b: bytes = b"",
        prefix_to_a: bytes = b"",
        on_bytes: OnBytes | None = None,
        mode: int = MODE_AUTO,
        a_hup: bool = False,
        b_hup: bool = False,
        a_ready: bool = True,
    ) -> Relay:
        """Relay between two connected, non-blocking sockets (watched already or not).

        ``a_hup`` / ``b_hup``: an event already reported RDHUP/HUP/ERR on that socket to its
        previous handler (such an edge is not raised again). ``a_ready=False``: the caller
        knows a is drained and saw no IN edge since, so the relay skips its first read.
        """
        relay = Relay(self, a, b, prefix_to_b, prefix_to_a, on_bytes, mode, on_done)
        relay.up.src_hup = a_hup
        relay.up.src_ready = a_ready or a_hup
        relay.down.src_hup = b_hup
        try:
            for fd in (relay.fd_a, relay.fd_b):
                if fd in self._handlers:
                    self._handlers[fd] = relay
                else:
                    self.watch(fd, relay)
        except OSError as exc:
            relay.abort(exc)
            return relay
        relay.step()
        return relay

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug: fail everything rather than hang it
            log.exception("relay engine crashed")
            error = EngineCrashed("the relay engine crashed")
            error.__cause__ = exc
            with self._lock:  # call_soon sees either a live engine or a fully failed one
                self.dead = True
                calls = list(self._calls)
                self._calls.clear()
            for handler in {id(h): h for h in self._handlers.values()}.values():
                try:
                    handler.abort(error)
                except Exception:
                    log.exception("relay engine: a handler failed while aborting")
            for _, fail in calls:
                if fail is not None:
                    fail(error)
            self.close()

    def close(self) -> None:
        """Release the engine's own fds (after a crash, or in a forked child)."""
        self._epoll.close()
        try:
            os.close(self._wake)
        except OSError:
            pass

    def _loop(self) -> None:
        poll = self._epoll.poll
        handlers = self._handlers
        wake = self._wake
        timers = self._timers
        monotonic = time.monotonic
        while True:
            while timers and timers[0][2].fn is None:  # cancelled: no need to wake for it
                heapq.heappop(timers)
                self._cancelled -= 1
            if self._again:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - monotonic())
            else:
                timeout = -1.0
            for fd, events in poll(timeout):
                if fd == wake:
                    os.eventfd_read(wake)  # type: ignore[attr-defined]
                    self._run_calls()
                    continue
                handler = handlers.get(fd)
                if handler is None:  # released earlier in this batch
                    continue
                try:
                    handler.on_event(fd, events)
                except Exception as exc:
                    handler.abort(exc)
            if timers and timers[0][0] <= monotonic():
                self._run_timers(monotonic())
            if self._again:
                again, self._again = self._again, []
                for handler in again:
                    try:
                        handler.step()
                    except Exception as exc:
                        handler.abort(exc)

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, fail = self._calls.popleft()
            try:
                fn()
            except Exception as exc:  # fails that caller only
                if fail is None:
                    raise
                fail(exc)

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            fn = timer.fn
            if fn is None:
                self._cancelled -= 1
            else:
                timer.fn = None
                try:
                    fn()
                except Exception:  # a timer's owner handles its own errors: this is a bug
                    log.exception("relay engine: a timer callback failed")


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """The engine of this process, started on first use (or after a crash or a fork)."""
    global _engine
    with _engine_lock:
        if _engine is None or _engine.dead or _engine.pid != os.getpid():
            _engine = Engine()
        return _engine


def _forget_engine_after_fork() -> None:
    # The thread did not survive the fork; its fds did. The child starts its own engine.
    global _engine, _engine_lock
    if _engine is not None and not _engine.dead:
        _engine.dead = True
        _engine.close()
    _engine = None
    _engine_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_engine_after_fork)
