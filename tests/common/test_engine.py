"""The relay engine's reactor API (dask_gateway_common.engine): watchers, timers, calls from
other threads, failure containment. Relays themselves are tested in test_relay.py."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest
import trio

from dask_gateway_common import engine as engine_module
from dask_gateway_common.engine import ENGINE_AVAILABLE, EV_READ, Engine, Handler, get_engine

DEADLINE = 10


@pytest.fixture
def engine() -> Engine:
    assert ENGINE_AVAILABLE, "the relay engine is required on this platform"
    return get_engine()


def run_in(engine: Engine, fn: Callable[[], object]) -> object:
    """Run ``fn`` in the engine thread and return its result (blocking this thread)."""
    done = threading.Event()
    box: list[object] = []

    def call() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            box.append(exc)
        done.set()

    engine.call_soon(call)
    assert done.wait(DEADLINE)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


class Recorder(Handler):
    """Records events; raises on demand; notes its abort."""

    def __init__(self, explode: bool = False) -> None:
        self.events: list[tuple[int, int]] = []
        self.aborted: list[BaseException | None] = []
        self.explode = explode
        self.seen = threading.Event()
        self.gone = threading.Event()

    def on_event(self, fd: int, events: int) -> None:
        self.events.append((fd, events))
        self.seen.set()
        if self.explode:
            raise KeyError("handler bug")

    def abort(self, error: BaseException | None) -> None:
        self.aborted.append(error)
        self.gone.set()


def test_watch_rebind_unwatch(engine: Engine) -> None:
    a, b = socket.socketpair()
    first, second = Recorder(), Recorder()
    try:
        a.setblocking(False)
        run_in(engine, lambda: engine.watch(a.fileno(), first))
        assert first.seen.wait(DEADLINE)  # a connected socket is writable at once
        run_in(engine, lambda: engine.rebind(a.fileno(), second))
        b.send(b"x")
        assert second.seen.wait(DEADLINE)
        assert second.events[-1][1] & EV_READ
        with pytest.raises(KeyError):
            run_in(engine, lambda: engine.rebind(b.fileno(), second))  # not watched
        run_in(engine, lambda: engine.unwatch(a.fileno(), first))  # not first's any more
        second.seen.clear()
        b.send(b"y")
        assert second.seen.wait(DEADLINE)
        run_in(engine, lambda: engine.unwatch(a.fileno()))
        second.seen.clear()
        b.send(b"z")
        run_in(engine, lambda: None)  # a full loop turn later: no event
        assert not second.seen.is_set()
    finally:
        a.close()
        b.close()


def test_a_failing_handler_is_aborted_alone(engine: Engine) -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    bad, good = Recorder(explode=True), Recorder()
    try:
        run_in(engine, lambda: engine.watch(a.fileno(), bad))
        run_in(engine, lambda: engine.watch(c.fileno(), good))
        assert bad.gone.wait(DEADLINE)
        assert isinstance(bad.aborted[0], KeyError)
        assert good.seen.wait(DEADLINE)
        good.seen.clear()
        d.send(b"still served")
        assert good.seen.wait(DEADLINE)
        assert not good.aborted
    finally:
        for fd in (a.fileno(), c.fileno()):
            run_in(engine, lambda fd=fd: engine.unwatch(fd))
        for s in (a, b, c, d):
            s.close()


def test_timers_fire_in_order_and_cancel(engine: Engine) -> None:
    fired: list[str] = []
    done = threading.Event()

    def schedule() -> None:
        engine.call_later(0.05, lambda: fired.append("late"))
        engine.call_later(0.0, lambda: fired.append("soon"))
        engine.call_later(0.02, lambda: fired.append("cancelled")).cancel()
        engine.call_later(0.06, done.set)

    run_in(engine, schedule)
    assert done.wait(DEADLINE)
    assert fired == ["soon", "late"]


def test_cancelled_timers_do_not_pile_up(engine: Engine) -> None:
    def churn() -> int:
        for _ in range(5000):
            engine.call_later(3600, lambda: None).cancel()
        return len(engine._timers)

    assert run_in(engine, churn) < 2100  # purged as they pile up, not kept for an hour


def test_a_failing_call_reaches_its_fail_callback(engine: Engine) -> None:
    failed = threading.Event()
    errors: list[BaseException | None] = []

    def fail(error: BaseException | None) -> None:
        errors.append(error)
        failed.set()

    def broken() -> None:
        raise ValueError("call bug")

    engine.call_soon(broken, fail=fail)
    assert failed.wait(DEADLINE)
    assert isinstance(errors[0], ValueError)
    run_in(engine, lambda: None)  # the engine lives on


async def test_a_dead_engine_fails_calls_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(self: object) -> None:
        raise SystemError("simulated engine bug")

    engine = get_engine()
    monkeypatch.setattr(engine_module.Engine, "_run_calls", explode)
    errors: list[BaseException | None] = []
    engine.call_soon(lambda: None, fail=errors.append)  # the wake-up kills the loop
    with trio.fail_after(DEADLINE):
        for _ in range(DEADLINE * 200):  # the engine thread flips it: no event to wait on
            if engine.dead:
                break
            await trio.sleep(0.005)
    assert isinstance(errors[0], engine_module.EngineCrashed)
    with pytest.raises(RuntimeError, match="stopped"):
        engine.call_soon(lambda: None)
    engine.call_soon(lambda: None, fail=errors.append)
    assert isinstance(errors[1], RuntimeError)
    monkeypatch.undo()
    assert get_engine() is not engine  # a new one takes over
    run_in(get_engine(), lambda: None)


def test_cancelled_timers_do_not_keep_the_loop_waking(engine: Engine) -> None:
    """Cancelled timers at the head of the heap are dropped before the next wait, so
    the loop does not wait with a timeout (or wake up) for them."""
    mine: list[object] = []

    def schedule() -> None:
        for _ in range(10):
            timer = engine.call_later(3600, lambda: None)
            timer.cancel()
            mine.append(timer)

    run_in(engine, schedule)
    run_in(engine, lambda: None)  # one more loop turn
    left = run_in(engine, lambda: [entry[2] for entry in engine._timers])
    assert isinstance(left, list)
    assert not any(timer in left for timer in mine)
