"""Stopping on a preemption notice (SIGTERM) at a step every process agrees on, after a clean save.

- One process: a SIGTERM handler sets a flag; the loop saves at the next step boundary and exits 0.
- Several processes (jax.distributed): JAX's preemption sync manager owns SIGTERM (its notifier replaces any
  Python handler when jax.distributed initialises). The notice of any one host reaches all of them, and
  `multihost_utils.reached_preemption_sync_point(step)`, called at every step by every process, is True on
  the same step everywhere: all save that step and leave the loop together. (A per-process flag let one host
  leave while another entered the next collective: a hang, and a preempted pod job that never saved.)
- Before the first step (startup: imports, compilation, data preparation) a SIGTERM is remembered and the run
  ends 0 at the loop's start with nothing new to save. After the last checkpoint is written it ends the command
  at once (`Preempted`, exit 0): the post-training evaluation is skipped, the checkpoint is complete.
"""
from __future__ import annotations

import contextlib
import signal
import threading

_current: Preemption | None = None


class Preempted(Exception):
    """SIGTERM after the last checkpoint was saved: the command stops at once and exits 0."""


def _coordinated() -> bool:
    from jax._src import distributed
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class Preemption:
    def __init__(self):
        self.requested = False
        self._raise = False
        self._old = None

    def _handle(self, *_):
        self.requested = True
        if self._raise:
            raise Preempted()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # tests may train from a worker thread
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        # On several processes the sync manager's handler replaced ours: leave it there.
        if self._old is not None and not _coordinated():
            signal.signal(signal.SIGTERM, self._old)
        self._old = None

    def request(self) -> None:
        """Stop at this step as a preemption would (`train(stop_after=...)`); same step on every process."""
        self.requested = True

    def before_start(self) -> bool:
        """True when a SIGTERM came during startup (on any process: one collective, once, at the first step)."""
        if not _coordinated():
            return self.requested
        import numpy as np
        from jax.experimental import multihost_utils
        self.requested = bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))
        return self.requested

    def stop_at(self, step: int) -> bool:
        """Whether to save `step` and stop; call once per step on every process."""
        if _coordinated():
            from jax.experimental import multihost_utils
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def past_last_save(self) -> None:
        """From here a SIGTERM ends the command at once; raises now if one already came."""
        self._raise = True
        if self.requested:
            raise Preempted()


@contextlib.contextmanager
def handling():
    """The run's Preemption, installed for the block; a nested call (train() inside `mathlm train`) shares it."""
    global _current
    if _current is not None:
        yield _current
        return
    _current = Preemption()
    _current.install()
    try:
        yield _current
    finally:
        _current.uninstall()
        _current = None
