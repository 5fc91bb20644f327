"""Suite-wide hygiene for the machine the tests run on.

Many tests start real login shells for the user running the suite (root here). When that
user's shell start-up runs `pyenv init` (as on the CI machines), every shell takes pyenv's
rehash lock for a moment; a test that kills a shell at that moment leaves the lock behind,
and every later login shell then waits up to a minute for it, so unrelated tests fail with
"no output". The lock is removed only when it is clearly stale: old, and no rehash running.
"""

from __future__ import annotations

import os
import pwd
import time

import pytest
from proc_util import pids_with_cmdline

STALE_LOCK_SECS = 5.0  # a rehash takes well under a second


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


@pytest.fixture(autouse=True)
def _no_stale_pyenv_lock():
    _clear_stale_pyenv_lock(_pyenv_shim_lock())
    yield
