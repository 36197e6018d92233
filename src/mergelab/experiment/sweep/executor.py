"""Where trials run: in this process (``inline``) or as Ray tasks (``ray``); both call
:func:`~mergelab.experiment.sweep.trial.execute_trial`, the one trial function.

An executor takes payloads (:meth:`submit`) and returns finished records one at a time (:meth:`next_done`).
The inline executor runs them in submission order when asked for the next result; the Ray executor submits
each as a task with the trial's resources (``num_cpus``, ``num_gpus``; Moritz et al., OSDI 2018) and returns
whichever finishes first. A Ray-level failure (a worker killed, out of memory) becomes a failed record.

Ray is imported only here, and only for ``ray``: ``pip install 'mergelab[cluster]'``.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mergelab.core.errors import InputError
from mergelab.experiment.sweep.trial import execute_trial, write_record

EXECUTORS = ("ray", "inline")
# what every Ray worker is started with (the driver's values when it has them)
WORKER_ENV = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "MERGELAB_CACHE", "HF_HOME")


def _failed(payload: Mapping[str, Any], error: str) -> dict[str, Any]:
    return {**payload["trial"], "status": "failed", "error": error, "host": socket.gethostname(),
            "executor": payload.get("executor")}


class InlineExecutor:
    """Trials one after the other in this process, in the order submitted."""

    name = "inline"

    def __init__(self) -> None:
        self._queue: deque[tuple[int, dict[str, Any]]] = deque()
        self._next = 0
        self.slots = 1

    def submit(self, payload: dict[str, Any], cpus: float = 1, gpus: float = 0) -> int:
        self._next += 1
        self._queue.append((self._next, {**payload, "executor": self.name}))
        return self._next

    def pending(self) -> int:
        return len(self._queue)

    def next_done(self) -> tuple[int, dict[str, Any]]:
        handle, payload = self._queue.popleft()
        return handle, execute_trial(payload)

    def cancel_all(self, settled: Callable[[float], bool] | None = None) -> None:
        self._queue.clear()  # nothing runs between two next_done calls

    def close(self) -> None:
        pass


class RayExecutor:
    """Each trial a Ray task with its resources. ``address``: join that cluster; else start a local Ray with
    ``num_cpus`` (default: this machine's cores), or use the one this process already started."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise InputError("--executor ray needs the package ray (pip install 'mergelab[cluster]'); or run the "
                             "trials in this process with --executor inline") from None
        self.ray = ray
        self.started = False
        env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
        if not ray.is_initialized():
            runtime_env = {"env_vars": env} if env else None
            if address:  # "HOST:6379", "auto" or "ray://HOST:10001" (Ray Client)
                try:
                    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise InputError(f"--address {address}: cannot join that Ray cluster ({exc}); is `ray start "
                                     "--head` running there, and is the port reachable?") from None
            else:
                # Ray starts workers at nice 15: on a machine running anything else, the sweep we start for
                # the user would get a sliver of the cores (docs/cluster.md); the user's setting wins
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                         runtime_env=runtime_env)
            self.started = True
        elif address:
            ctx = ray.get_runtime_context()
            if getattr(ctx, "gcs_address", None) not in (None, address):
                raise InputError(f"--address {address}: this process is already connected to Ray at {ctx.gcs_address}")
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(execute_trial)
        self._refs: dict[Any, tuple[int, dict[str, Any]]] = {}
        self._next = 0

    def submit(self, payload: dict[str, Any], cpus: float = 1, gpus: float = 0) -> int:
        self._next += 1
        payload = {**payload, "executor": self.name}
        ref = self._remote.options(num_cpus=cpus, num_gpus=gpus, max_retries=0).remote(payload)
        self._refs[ref] = (self._next, payload)
        return self._next

    def pending(self) -> int:
        return len(self._refs)

    def next_done(self) -> tuple[int, dict[str, Any]]:
        ready, _ = self.ray.wait(list(self._refs), num_returns=1)
        ref = ready[0]
        handle, payload = self._refs.pop(ref)
        try:
            record = self.ray.get(ref)
        except Exception as exc:  # the task never returned: a killed worker, out of memory, a lost node
            record = _failed(payload, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
            write_record(Path(payload["sweep_dir"]), record)
        return handle, record

    def cancel_all(self, settled: Callable[[float], bool] | None = None) -> None:
        """Stop what is in flight (a sweep interrupted): a queued trial never starts, a running one gets a
        KeyboardInterrupt (which the trial does not catch), so it writes nothing and runs again on restart. The
        workers stay up (a killed driver's workers are ended by Ray itself).

        ``settled(timeout)`` says whether every trial has really stopped (the sweep's fence): Ray may mark a
        cancelled task done while its worker is still finishing it. A trial that has not stopped a minute after
        the interrupt (stuck in native code) has its worker killed (``force=True``)."""
        refs = list(self._refs)
        self._refs.clear()
        for ref in refs:
            try:
                self.ray.cancel(ref, force=False)
            except Exception:  # already finished
                pass
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=30)
        if settled is None or settled(60.0):
            return
        for ref in refs:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass
        settled(30.0)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(name: str, *, address: str | None = None, num_cpus: int | None = None):
    if name not in EXECUTORS:
        raise InputError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}")
    if name == "inline":
        if address:
            raise InputError("--address joins a Ray cluster; drop --executor inline")
        return InlineExecutor()
    return RayExecutor(address=address, num_cpus=num_cpus)


__all__ = ["EXECUTORS", "InlineExecutor", "RayExecutor", "make_executor"]
