"""The fence between a sweep's driver run and its trials: after an interrupted run returns, no trial of that run
writes a record any more.

Cancelling a Ray task (``ray.cancel``) is a request: ``ray.wait`` can report a cancelled task done while its worker
is still finishing it, and a task that was about to finish may still write its record. A restarted sweep would then
find a record that appeared after the interrupted run had returned. The fence makes the end of a run a fact of the
sweep folder instead of Ray's bookkeeping:

- :func:`open_run` writes a fresh token into ``<sweep>/.run-token``; every trial of the run carries it.
- :func:`trial_slot`, around a trial and its record: a *shared* ``flock`` on ``<sweep>/.trials.lock``, then the
  token check. A trial whose run is no longer the folder's current one does nothing and writes nothing.
- :func:`retire_run`, when the driver is interrupted: the token is replaced (no trial of this run starts from now
  on), and :func:`wait_for_trials` takes the *exclusive* lock, which it gets only once every running trial has
  left its slot (finished and written, or interrupted).

``flock`` locks belong to the open file and are released when the holder exits or is killed, so none goes stale.
A worker whose disk is not the driver's (no sweep folder there, or no token file) runs unfenced: what it writes
lands on its own disk, never in the driver's folder. Where ``fcntl`` does not exist (Windows) there is no lock;
the token still stops trials that had not started.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergelab.core.atomic import atomic_write_text

TOKEN_FILE = ".run-token"
LOCK_FILE = ".trials.lock"
_RETIRED = "retired"


def open_run(sweep_dir: Path) -> str:
    """Make a new run the sweep folder's current one; returns its token."""
    token = uuid.uuid4().hex
    atomic_write_text(sweep_dir / TOKEN_FILE, token + "\n")
    return token


def _current(sweep_dir: Path, token: str) -> bool:
    try:
        found = (sweep_dir / TOKEN_FILE).read_text().strip()
    except FileNotFoundError:  # a worker's own disk: the driver's folder is elsewhere
        return True
    return found == token


def _fcntl():
    try:
        import fcntl  # noqa: PLC0415

        return fcntl
    except ImportError:  # pragma: no cover  (Windows)
        return None


@contextmanager
def trial_slot(sweep_dir: Path, token: str | None) -> Iterator[bool]:
    """Hold the trials' shared lock while the block runs; yields whether the trial may run and write (its run is
    still the folder's current one). ``token`` None (a trial called directly, not by a sweep run): no fence."""
    if token is None or not sweep_dir.is_dir():
        yield True
        return
    fcntl = _fcntl()
    fd = os.open(sweep_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield _current(sweep_dir, token)
    finally:
        os.close(fd)  # releases the lock


def retire_run(sweep_dir: Path) -> None:
    """No trial of the current run starts from now on (those running are not stopped: :func:`wait_for_trials`)."""
    if sweep_dir.is_dir():
        atomic_write_text(sweep_dir / TOKEN_FILE, _RETIRED + "\n")


def wait_for_trials(sweep_dir: Path, timeout: float) -> bool:
    """Wait until no trial holds a slot in ``sweep_dir`` (at most ``timeout`` seconds); True when none does."""
    fcntl = _fcntl()
    if fcntl is None or not sweep_dir.is_dir():  # pragma: no cover  (Windows)
        return True
    fd = os.open(sweep_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
    finally:
        os.close(fd)


__all__ = ["LOCK_FILE", "TOKEN_FILE", "open_run", "retire_run", "trial_slot", "wait_for_trials"]
