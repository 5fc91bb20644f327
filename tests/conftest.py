"""Suite-wide hygiene for the machine the tests run on.

Many tests start real login shells for the user running the suite (root here). When that
user's shell start-up runs `pyenv init` (as on the CI machines), every shell takes pyenv's
rehash lock for a moment; a test that kills a shell at that moment leaves the lock behind,
and every later login shell then waits up to a minute for it, so unrelated tests fail with
"no output". The lock is removed only when it is clearly stale: old, and no rehash running.

Order: the suite runs 4-wide (`make test`: pytest-xdist, --dist loadgroup), and xdist hands
tests out in collection order. A minute-long scenario collected late would start when the
other workers are nearly done and stretch the run by its whole length, so the long scenarios
(marked ``slow``) are collected first, longest budget (timeout mark) first; the quick tests
then fill the workers around them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import time
from typing import Callable, ContextManager, Dict

import pytest
from proc_util import pids_with_cmdline

STALE_LOCK_SECS = 5.0  # a rehash takes well under a second


def _restore_terminal_signals() -> None:
    """A suite started in the background of a script (``make test &``) inherits SIGINT and
    SIGQUIT ignored, and so would every program a test starts: a test's ^C would then do
    nothing. A user starting mp or mp_keygen from a terminal has them at their defaults;
    the tests run them that way wherever the suite was started."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


_restore_terminal_signals()


def _pyenv_shim_lock() -> str:
    home = pwd.getpwuid(os.getuid()).pw_dir
    root = os.environ.get("PYENV_ROOT") or os.path.join(home, ".pyenv")
    return os.path.join(root, "shims", ".pyenv-shim")


def _clear_stale_pyenv_lock(path: str) -> None:
    try:
        age = time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECS and not pids_with_cmdline(b"pyenv-rehash"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _expected_length(item: pytest.Item) -> float:
    """0 for a quick test, else the slow test's time budget (its timeout mark): a rough rank
    of how long it runs, so the longest start first."""
    if item.get_closest_marker("slow") is None:
        return 0.0
    timeout = item.get_closest_marker("timeout")
    return float(timeout.args[0]) if timeout and timeout.args else 1.0


def pytest_collection_modifyitems(items: list) -> None:
    # Stable: quick tests keep their collection order (every xdist worker must collect the
    # same order, and does: this depends only on the items).
    items.sort(key=lambda item: -_expected_length(item))


@pytest.fixture(autouse=True)
def _no_stale_pyenv_lock():
    _clear_stale_pyenv_lock(_pyenv_shim_lock())
    yield


class WorkerShared:
    """What the tests on one worker share (server_util.shared_server): each thing made at
    its first use, and closed when the worker is done."""

    def __init__(self, stack: contextlib.ExitStack):
        self._stack = stack
        self._made: Dict[str, object] = {}

    def get(self, name: str, make: Callable[[], ContextManager]):
        if name not in self._made:
            self._made[name] = self._stack.enter_context(make())
        return self._made[name]


@pytest.fixture(scope="session")
def worker_shared():
    with contextlib.ExitStack() as stack:
        yield WorkerShared(stack)
