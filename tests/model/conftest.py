"""Shared fixtures of the core's tests."""

import signal

import pytest


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, even when pytest was started in the
    background by a shell without job control (which starts it with SIGINT ignored): the tests
    that send SIGINT check what an interrupted write leaves behind."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
