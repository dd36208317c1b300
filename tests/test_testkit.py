"""The shared test helpers do what the tests rely on: a client thread that raises fails its test."""

from __future__ import annotations

import threading

import pytest
from testkit import Threads


def test_an_exception_in_a_client_thread_fails_the_join() -> None:
    def client() -> None:
        raise ConnectionResetError("the server dropped the connection")

    threads = Threads()
    threads.start(lambda: None)
    threads.start(client)
    with pytest.raises(AssertionError, match=r"1 thread\(s\) raised; the first, in client-1: ConnectionResetError"):
        threads.join(5)


def test_a_thread_still_running_fails_the_join_and_clean_threads_pass() -> None:
    stop = threading.Event()
    threads = Threads()
    threads.start(stop.wait)
    with pytest.raises(AssertionError, match="still running"):
        threads.join(0.05)
    stop.set()
    threads.join(5)  # now every thread has ended without raising
