"""The clocks the proxy keeps time on: see L{cargobay.server_tap._monotonic_timers}."""

import time

from twisted.internet.epollreactor import EPollReactor

from cargobay.server_tap import CalendarClock, _monotonic_timers


def test_the_reactor_times_its_calls_on_the_monotonic_clock():
    reactor = EPollReactor()  # not installed: only its timed calls are used
    fired: list[str] = []
    early = reactor.callLater(100, fired.append, "early")
    late = reactor.callLater(300, fired.append, "late")
    _monotonic_timers(reactor)
    assert reactor.seconds is time.monotonic
    # Scheduled before: moved onto the new clock, due after the same delay.
    assert abs(early.getTime() - (time.monotonic() + 100)) < 30
    assert abs(late.getTime() - (time.monotonic() + 300)) < 30
    fresh = reactor.callLater(5, fired.append, "fresh")
    assert abs(fresh.getTime() - (time.monotonic() + 5)) < 30
    # The soonest call is the reactor's next wake-up: its heap stayed whole.
    assert 0 < reactor.timeout() <= 5
    _monotonic_timers(reactor)  # twice is once
    assert abs(early.getTime() - (time.monotonic() + 100)) < 30
    assert fired == []


def test_stored_times_stay_calendar_times():
    reactor = EPollReactor()
    _monotonic_timers(reactor)
    clock = CalendarClock(reactor)
    assert abs(clock.seconds() - time.time()) < 30
    call = clock.callLater(10, lambda: None)
    assert abs(call.getTime() - (time.monotonic() + 10)) < 30
    call.cancel()
