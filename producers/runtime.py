"""The process-wide SpanProducer: created on first use from ``load_settings()``, flushed at interpreter exit.

``configure()`` replaces it explicitly (tests, an agent with its own settings). Nothing here ever raises
into the agent. A configuration value that cannot be used is a warning naming it, and its field keeps its
default. When no broker is configured and no local stack runs, the producer keeps spans in its on-disk
spool (bounded, drops counted) and sends them once a stack starts (see
:class:`~boltstream.producers.span_producer.SpanProducer`). Only when no producer can start at all (e.g. a
spool directory that cannot be written) are spans discarded: the first time is logged with the reason, all are
counted in ``stats()["discarded_spans"]``, and ``flush()`` returns False.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from boltstream.infra.common.config import Settings, load_settings
from boltstream.producers.pending_span import PendingSpan
from boltstream.producers.span_producer import DeliveryListener, SpanProducer

log = logging.getLogger("boltstream.producer")

_lock = threading.RLock()
_producer: SpanProducer | None = None
_settings: Settings | None = None
_discarded = 0
_failed_emits = 0  # emit calls that failed (each logged), their spans lost
_lost_at_flush = 0  # _discarded + _failed_emits at the previous flush()
_unavailable_reason: str | None = None
#: Called with ``idle_only``: True on every background cycle, False on flush and exit.
_end_of_batch_hooks: list[Callable[[bool], None]] = []
#: Called with every span this process records (a tracer's ``get_last_trace``); empty on the hot path.
_observers: list[Callable[[PendingSpan], None]] = []


def on_flush(hook: Callable[[bool], None]) -> None:
    """Register ``hook(idle_only)``: run before every flush (False) and every background cycle (True)."""
    _end_of_batch_hooks.append(hook)


def settings() -> Settings:
    """The settings in force: the configured ones, else ``load_settings()`` (loaded once).

    A value of the config file or of a ``BOLTSTREAM_*`` variable that cannot be used is a warning naming
    it, and its field keeps its default (:func:`config_warning`): an agent never fails because of the
    SDK's configuration.
    """
    global _settings
    if _settings is None:
        with _lock:
            if _settings is None:
                try:
                    _settings = load_settings(on_invalid=config_warning)
                except Exception as exc:  # a failure no value explains (a bug): the defaults, said once
                    config_warning(f"the configuration cannot be loaded ({type(exc).__name__}: {exc})")
                    _settings = Settings()
    return _settings


_warned: set[str] = set()


def config_warning(complaint: str) -> None:
    """Warn (once per process) about a configuration value that is left out for its default."""
    if complaint not in _warned:
        _warned.add(complaint)
        log.warning("boltstream: configuration ignored (the default is used instead): %s", complaint)


def configure(
    settings_: Settings | None = None, *, on_delivery: DeliveryListener | None = None, **overrides: Any
) -> SpanProducer:
    """Start (or restart) the process's SpanProducer with ``settings_`` or ``load_settings(**overrides)``.

    A producer already running is flushed and closed first. ``on_delivery(topic, value, error)`` is
    called on the producer's thread for every delivery report (metrics, tests).
    """
    global _producer, _settings, _unavailable_reason
    with _lock:
        shutdown()
        _settings = settings_ if settings_ is not None else load_settings(on_invalid=config_warning, **overrides)
        _producer = SpanProducer(_settings, on_delivery=on_delivery)
        _producer.on_tick(lambda: _run_hooks(idle_only=True))
        _unavailable_reason = None
        return _producer


def producer() -> SpanProducer | None:
    """The running SpanProducer, starting it on first use; None if no broker can be configured."""
    global _unavailable_reason
    if _producer is not None:
        return _producer
    with _lock:
        if _producer is None and _unavailable_reason is None:
            try:
                configure(settings())
            except Exception as exc:  # never into the agent: say why once, count the rest
                _unavailable_reason = f"{type(exc).__name__}: {exc}"
                log.error("boltstream spans are discarded: no producer could start (%s)", _unavailable_reason)
        return _producer


def observe(observer: Callable[[PendingSpan], None]) -> None:
    """Show ``observer`` every span recorded from now on (it must be quick and never raise)."""
    _observers.append(observer)


def unobserve(observer: Callable[[PendingSpan], None]) -> None:
    """Stop showing spans to ``observer`` (no error if it was not observing)."""
    with _lock:
        if observer in _observers:
            _observers.remove(observer)


def record(span: PendingSpan) -> None:
    """Hand one span to the producer (the agent's hot path)."""
    global _discarded
    if _observers:
        for observer in tuple(_observers):
            observer(span)
    running = _producer or producer()
    if running is None:
        _discarded += 1
        return
    running.append(span)


def count_lost_span() -> None:
    """Count a span an emit call could not record (it logged why): ``stats()["failed_emits"]``, and the next
    ``flush()`` returns False."""
    global _failed_emits
    _failed_emits += 1


def send_reward_record(reward: dict[str, Any]) -> bool:
    """Queue a Reward record; False if no producer could start."""
    global _discarded
    running = _producer or producer()
    if running is None:
        _discarded += 1
        return False
    running.send_reward(reward)
    return True


def flush(timeout: float | None = None) -> bool:
    """End implicit rollouts, then wait until every span and reward so far is delivered: False on timeout,
    when anything was dropped or discarded since the previous flush, or while no broker is configured."""
    global _lost_at_flush
    _run_hooks(idle_only=False)
    running = _producer
    delivered = True if running is None else running.flush(timeout)
    lost, _lost_at_flush = _discarded + _failed_emits != _lost_at_flush, _discarded + _failed_emits
    return delivered and not lost


def shutdown(timeout: float | None = None) -> bool:
    """Flush within ``timeout`` and stop the producer; undelivered data stays in the spool for next time."""
    global _producer
    with _lock:
        running, delivered = _producer, True
        if running is not None:
            _run_hooks(idle_only=False)
            delivered = running.close(timeout)
            _producer = None
        return delivered


def stats() -> dict[str, Any]:
    """Counters of the running producer and its spool, what it holds in memory (``in_memory``: spans queued,
    messages in flight), whether it waits for a broker to be configured (``awaiting_broker``: spans go to the
    spool), plus spans discarded for lack of a producer and emit calls that failed (``failed_emits``)."""
    running = _producer
    result: dict[str, Any] = {
        "discarded_spans": _discarded,
        "failed_emits": _failed_emits,
        "unavailable_reason": _unavailable_reason,
    }
    if running is not None:
        result["awaiting_broker"] = running.awaiting_broker
        result.update(asdict(running.stats))
        result["in_memory"] = running.in_memory()
        result.update({f"spool_{k}": v for k, v in asdict(running.spool.stats).items()})
    return result


def _run_hooks(idle_only: bool) -> None:
    for hook in _end_of_batch_hooks:
        try:
            hook(idle_only)
        except Exception:
            log.exception("producer hook failed; ignored")


def _at_exit() -> None:
    running = _producer
    if running is not None and running.awaiting_broker:
        shutdown(running.settings.producer.flush_timeout)
        if len(running.spool):
            log.warning(
                "boltstream: no broker was configured: %d message(s) of spans wait in %s for the next run of this "
                "program that has one",
                len(running.spool),
                running.spool.directory,
            )
    elif running is not None and not shutdown(running.settings.producer.flush_timeout):
        log.warning(
            "boltstream: not every span was delivered before exit: what was dropped is counted in agl.stats() "
            "(dropped_*), the rest waits in %s",
            running.spool.directory,
        )


def _forget_after_fork() -> None:
    """A forked child does not inherit the producer's thread: it starts its own on first use. It lets go of
    the parent's spool, which stays the parent's (and is adopted by another process once the parent ends)."""
    global _producer
    if _producer is not None:
        _producer.spool.forget_after_fork()
    _producer = None


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_forget_after_fork)
