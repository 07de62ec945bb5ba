"""Exact resume: where a run checkpoints, how a loop picks up where it stopped, and SIGTERM.

A run is a sequence of *phases* (teacher training; a ZSKT run's warm-up, main part and endings),
each a loop over steps `start..end` driven by `abd_jax.kd.loop.run_steps` or `abd_jax.teacher.fit`.
Each phase checkpoints into its own directory `DIR/<phase name>` every `every` steps and always at
its last step, so a resumed run

- skips a finished phase (its final checkpoint is restored),
- continues an interrupted one from its latest checkpoint, with the same step counter, PRNG key,
  optimizer states, evaluation history and host-side pools: the step function derives all its
  randomness from the state (`fold_in(key, step)`), so the continuation computes what the
  uninterrupted run would have (tests/test_resume.py checks parameters and metrics bitwise).

Library code never installs signal handlers; entry points wrap the run in `handle_sigterm()`, and
the loops then write a checkpoint and raise `Preempted` at the next step boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from abd_jax.checkpoint import CheckpointError, RunCheckpointer

PyTree = Any
_SIGTERM = threading.Event()


class Preempted(RuntimeError):
    """SIGTERM arrived; the loop saved a checkpoint (if it had somewhere to save) and stopped."""


@contextlib.contextmanager
def handle_sigterm() -> Iterator[None]:
    """While active, SIGTERM asks the running loop to checkpoint and raise `Preempted` instead of
    killing the process mid-step. Main thread only (a Python signal-handler rule)."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())
    _SIGTERM.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _SIGTERM.clear()


def preemption_requested() -> bool:
    return _SIGTERM.is_set()


PREEMPTED_EXIT = 128 + 15  # what a shell reports for a process ended by SIGTERM


def run_preemptible(main: Callable[[], Any]) -> Any:
    """Runs a command's `main` under `handle_sigterm`: on SIGTERM the running loop checkpoints and
    the process exits with status 143 after printing how to continue (--resume)."""
    import sys

    try:
        with handle_sigterm():
            return main()
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)


def _dir_name(phase: str) -> str:
    return re.sub(r"[^\w+.=-]+", "_", phase).strip("_") or "phase"


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """Where a run checkpoints and how often.

    Attributes:
      directory: one subdirectory per phase is created under it.
      every: checkpoint every `every` steps of a phase (0: only at its end and on SIGTERM).
      resume: continue from the checkpoints there. Without it, existing checkpoints are an error
        rather than silently overwritten (they may be hours of someone's run).
      max_to_keep: checkpoints kept per phase (the newest).
    """

    directory: Path
    every: int = 0
    resume: bool = False
    max_to_keep: int = 3

    def open(self, phase: str, start: int, end: int) -> PhaseCheckpoint:
        """The checkpoints of the phase that runs steps start..end-1 under the name `phase`."""
        path = Path(self.directory) / f"{_dir_name(phase)}_{start}-{end}"
        ckpt = RunCheckpointer(path, max_to_keep=self.max_to_keep)
        latest = ckpt.latest_step()
        if latest is not None and not self.resume:
            ckpt.close()
            raise CheckpointError(
                f"{path} holds checkpoints of an earlier run (latest step {latest}); pass --resume to "
                f"continue it, or delete {self.directory} to start over"
            )
        return PhaseCheckpoint(ckpt, self.every, end)


@dataclasses.dataclass
class PhaseCheckpoint:
    """One phase's checkpoints, as the loops use them."""

    ckpt: RunCheckpointer
    every: int
    end: int
    last_saved: int | None = None

    def restore(self, like: PyTree, host_like: dict[str, np.ndarray] | None = None):
        """(state, next step, history, host arrays, meta) from the latest checkpoint, or None if
        the phase has none. `host_like` arrays are shapes to restore into (sample pools)."""
        if self.ckpt.latest_step() is None:
            return None
        r = self.ckpt.restore(like, host_like=host_like)
        return r.state, int(r.meta["step"]), list(r.meta.get("history", [])), r.host, r.meta

    def due(self, step: int) -> bool:
        """Whether to checkpoint after `step` steps: periodically, and always at the phase's end."""
        return step == self.end or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: PyTree, history: list[dict], *, host: dict[str, np.ndarray] | None = None,
             extra: dict[str, Any] | None = None, wait: bool = False) -> None:
        if step == self.last_saved:  # a periodic save and a SIGTERM save at the same step
            return
        self.last_saved = step
        self.ckpt.save(step, state, meta={"step": int(step), "history": history, **(extra or {})}, host=host,
                       wait=wait or step == self.end)

    def close(self) -> None:
        self.ckpt.close()


def closing(phase: PhaseCheckpoint | None) -> contextlib.AbstractContextManager:
    """Closes the phase's checkpointer on the way out, also when the loop raises (NaN, SIGTERM),
    so the saves already started are finished."""
    return contextlib.closing(phase) if phase is not None else contextlib.nullcontext()


def stop_if_preempted(phase: PhaseCheckpoint | None, step: int, save) -> None:
    """At a step boundary: if SIGTERM arrived, `save()` a checkpoint (when the phase has a
    checkpoint directory) and raise `Preempted` naming how to continue."""
    if not preemption_requested():
        return
    if phase is None:
        raise Preempted(f"SIGTERM at step {step}; no checkpoint directory was set, so nothing was saved")
    save()
    phase.ckpt.manager.wait_until_finished()
    raise Preempted(f"SIGTERM at step {step}: checkpoint saved in {phase.ckpt.directory}; rerun the same "
                    "command with --resume to continue")
