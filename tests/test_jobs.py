"""The long-job protocol: generators of Progress events that return their result, a cooperative cancel and pause
token, and elapsed time with a linear ETA."""

import threading
import time

import pytest

from napari_binn.jobs import CancelToken, Progress, ProgressClock, is_cancelled, run_job


def _counting(n, cancel=None):
    clock = ProgressClock(n)
    done = 0
    for step in range(1, n + 1):
        if is_cancelled(cancel):
            break
        done = step
        yield clock.event("count", step, f"step {step}", value=step)
    return done


def test_run_job_returns_the_result_and_passes_every_event():
    events = []
    assert run_job(_counting(4), events.append) == 4
    assert [e.step for e in events] == [1, 2, 3, 4] and events[-1].fraction == 1.0
    assert all(e.stage == "count" and e.total == 4 for e in events) and events[1].data == {"value": 2}
    assert events[-1].eta_s == 0.0 and events[0].elapsed_s >= 0.0


def test_cancel_stops_at_the_next_check_and_the_job_returns_what_it_has():
    token = CancelToken()

    def cancel_at_two(ev):
        if ev.step == 2:
            token.cancel()

    assert run_job(_counting(10, token), cancel_at_two) == 2
    assert token.cancelled and is_cancelled(token) and not is_cancelled(None)


def test_pause_waits_until_resumed_or_cancelled():
    token = CancelToken()
    token.pause()
    assert token.paused
    threading.Timer(0.3, token.resume).start()
    start = time.perf_counter()
    assert run_job(_counting(2, token)) == 2
    assert time.perf_counter() - start >= 0.25 and not token.paused
    token.pause()
    threading.Timer(0.2, token.cancel).start()
    assert is_cancelled(token) and not token.paused  # a cancel releases a paused job


def test_progress_fraction_is_clipped_and_unknown_without_total():
    assert Progress("s", 3, None).fraction is None and Progress("s", 3, 0).fraction is None
    assert Progress("s", 5, 4).fraction == 1.0 and Progress("s", 1, 4).fraction == pytest.approx(0.25)
