"""Logging: the rate limiter (with a fake clock) and structlog's console vs JSON output."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from esperd.logs import RateLimiter, configure_logging
from tests.support.timing import FakeClock

# ------------------------------------------------------------------ RateLimiter


def test_rate_limiter_allows_one_per_window_and_counts_the_rest() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock=clock)
    assert limiter.allow("malformed") == (True, 0)
    clock.now += 1.0
    assert limiter.allow("malformed") == (False, 0)
    clock.now += 8.9
    assert limiter.allow("malformed") == (False, 0)
    clock.now += 0.1  # exactly one window after the last allowed one
    assert limiter.allow("malformed") == (True, 2)
    # The count starts again after a report.
    assert limiter.allow("malformed") == (False, 0)
    clock.now += 10.0
    assert limiter.allow("malformed") == (True, 1)
    clock.now += 100.0
    assert limiter.allow("malformed") == (True, 0)


def test_rate_limiter_keys_are_independent() -> None:
    clock = FakeClock()
    limiter = RateLimiter(5.0, clock=clock)
    assert limiter.allow("a") == (True, 0)
    assert limiter.allow("b") == (True, 0)
    assert limiter.allow("a") == (False, 0)
    assert limiter.allow("a") == (False, 0)
    assert limiter.allow("b") == (False, 0)
    clock.now += 5.0
    assert limiter.allow("b") == (True, 1)
    assert limiter.allow("a") == (True, 2)
    assert limiter.allow("c") == (True, 0)


def test_rate_limiter_window_runs_from_the_last_allowed_event() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock=clock)
    assert limiter.allow("k")[0]
    for _ in range(19):  # suppressed events do not push the window forward
        clock.now += 0.5
        assert limiter.allow("k") == (False, 0)
    clock.now += 0.5  # 10.0 after the allowed one
    assert limiter.allow("k") == (True, 19)


def test_rate_limiter_uses_monotonic_time_by_default() -> None:
    limiter = RateLimiter(3600.0)
    assert limiter.allow("x") == (True, 0)
    assert limiter.allow("x") == (False, 0)
    assert limiter.window_s == 3600.0


def test_rate_limiter_zero_window_allows_everything() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0.0, clock=clock)
    assert [limiter.allow("k") for _ in range(3)] == [(True, 0)] * 3


# ------------------------------------------------------------------ configure_logging


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _emit(event: str = "hello", **kw: object) -> None:
    # A fresh logger each time: module-level loggers may be cached under an older config.
    structlog.get_logger("test").info(event, **kw)


def _lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line.strip()]


def test_non_tty_stream_gets_json_lines() -> None:
    stream = io.StringIO()
    assert not stream.isatty()
    configure_logging("info", "auto", stream)
    _emit("first", answer=42)
    _emit("second", subject="esper.r1.health")
    lines = _lines(stream)
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "first" and first["answer"] == 42
    assert first["level"] == "info"
    assert first["timestamp"].endswith("Z")  # ISO, UTC
    assert second["subject"] == "esper.r1.health"


def test_tty_stream_gets_console_output() -> None:
    stream = FakeTty()
    configure_logging("info", "auto", stream)
    _emit("console-hello", answer=42)
    out = stream.getvalue()
    assert "console-hello" in out
    assert "answer" in out and "42" in out
    for line in _lines(stream):
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)


def test_explicit_format_overrides_the_tty_check() -> None:
    tty = FakeTty()
    configure_logging("info", "json", tty)
    _emit("forced-json")
    assert json.loads(_lines(tty)[0])["event"] == "forced-json"

    plain = io.StringIO()
    configure_logging("info", "console", plain)
    _emit("forced-console")
    assert "forced-console" in plain.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(_lines(plain)[0])


def test_bound_contextvars_appear_in_output() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    with structlog.contextvars.bound_contextvars(run_id="r7", subject="esper.r7.state"):
        _emit("inside")
    _emit("outside")
    inside, outside = (json.loads(line) for line in _lines(stream))
    assert inside["run_id"] == "r7" and inside["subject"] == "esper.r7.state"
    assert "run_id" not in outside and "subject" not in outside


def test_bound_contextvars_appear_in_console_output() -> None:
    stream = FakeTty()
    configure_logging("info", "auto", stream)
    with structlog.contextvars.bound_contextvars(run_id="run-console-7"):
        _emit("inside")
    assert "run-console-7" in stream.getvalue()


def test_level_filters_lower_levels() -> None:
    stream = io.StringIO()
    configure_logging("warning", "json", stream)
    logger = structlog.get_logger("test")
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    assert [json.loads(line)["event"] for line in _lines(stream)] == ["w", "e"]


def test_exceptions_are_rendered_into_json() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    try:
        raise RuntimeError("boom-123")
    except RuntimeError:
        structlog.get_logger("test").exception("failed")
    record = json.loads(_lines(stream)[0])
    assert record["event"] == "failed"
    assert record["level"] == "error"
    assert "boom-123" in record["exception"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(KeyError):
        configure_logging("chatty", "json", io.StringIO())


def test_default_stream_follows_sys_stderr_after_it_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configured without a stream, logging writes to the stderr of the moment: a stderr
    replaced and closed since (a test runner's capture, an embedding program's) is not used."""
    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    configure_logging("info", "json")
    _emit("to-first")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr("sys.stderr", second)
    _emit("to-second")
    assert [json.loads(line)["event"] for line in _lines(second)] == ["to-second"]
