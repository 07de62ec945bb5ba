"""Exact resume (abd_jax/resume.py): an interrupted run continued from its checkpoints ends with
the same parameters and metrics as an uninterrupted run, bitwise on CPU (same program, same
inputs, and XLA:CPU is deterministic); SIGTERM writes a checkpoint; a NaN leaves the last good
checkpoint intact; existing checkpoints are never overwritten without --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from abd_jax.checkpoint import CheckpointError, RunCheckpointer, load_teacher
from abd_jax.kd.loop import run_steps
from abd_jax.resume import CheckpointPolicy, Preempted, handle_sigterm
from abd_jax.state import create_train_state
from abd_jax.teacher import fit

TX = optax.adam(1e-2)


class Interrupt(Exception):
    """Stands in for the process dying between two steps."""


def _toy_state(seed: int = 0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w": jax.random.normal(k1, (4, 3)), "b": jnp.zeros(3)}
    return create_train_state({"params": params}, TX, k2)


def _toy_step(state, const):
    """Draws its own data from fold_in(key, step), as the ZSKT pseudo-batch does."""
    x = jax.random.normal(jax.random.fold_in(state.key, state.step), (8, 4))

    def loss_fn(p):
        return jnp.mean((x @ p["w"] + p["b"] - const) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    upd, opt = TX.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, upd), opt_state=opt, step=state.step + 1), {
        "loss": loss}


def _evaluate(state):
    return {"acc": float(jnp.sum(state.params["w"])), "asr": float(jnp.sum(state.params["b"]))}


def _run(policy=None, on_step=None, pool=None, num_steps=9, step_fn=_toy_step):
    return run_steps(step_fn, _toy_state(), jnp.float32(1.0), num_steps=num_steps, evaluate=_evaluate, eval_every=2,
                     desc="toy", checkpoint=policy, on_step=on_step, host_state=pool)


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(jax.random.key_data(a.key)), jax.tree.leaves(jax.random.key_data(b.key))):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state, a.step)), jax.tree.leaves((b.params, b.opt_state, b.step))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _pooling(pool):
    def collect(i, s):
        pool["w"][i] = np.asarray(s.params["w"])
    return collect


def test_run_steps_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    ref_pool = {"w": np.zeros((9, 4, 3), np.float32)}
    ref, ref_hist = _run(on_step=_pooling(ref_pool))

    pool = {"w": np.zeros((9, 4, 3), np.float32)}
    collect = _pooling(pool)

    def die_after_6(i, s):
        collect(i, s)
        if i == 5:  # step 6 done; checkpoints at 3 and 6 (every 3), the one at 6 not yet written
            raise Interrupt

    policy = CheckpointPolicy(tmp_path / "ck", every=3)
    with pytest.raises(Interrupt):
        _run(policy, die_after_6, pool)
    assert RunCheckpointer(tmp_path / "ck" / "toy_0-9").latest_step() == 3
    pool = {"w": np.full((9, 4, 3), np.nan, np.float32)}  # a fresh process: the pool is restored
    out, hist = _run(CheckpointPolicy(tmp_path / "ck", every=3, resume=True), _pooling(pool), pool)
    _assert_same(out, ref)
    assert hist == ref_hist  # the evaluations before the interruption come back from the checkpoint
    np.testing.assert_array_equal(pool["w"], ref_pool["w"])

    # Resuming a finished phase restores its final state without running a step.
    pool2 = {"w": np.zeros((9, 4, 3), np.float32)}
    again, hist2 = _run(CheckpointPolicy(tmp_path / "ck", resume=True), lambda i, s: pytest.fail("ran a step"), pool2)
    _assert_same(again, ref)
    assert hist2 == ref_hist
    np.testing.assert_array_equal(pool2["w"], ref_pool["w"])


def test_existing_checkpoints_need_resume(tmp_path):
    _run(CheckpointPolicy(tmp_path / "ck", every=3), num_steps=3)
    with pytest.raises(CheckpointError, match="--resume"):
        _run(CheckpointPolicy(tmp_path / "ck", every=3), num_steps=3)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    ref, ref_hist = _run()

    def term_at_4(i, s):
        if i == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with handle_sigterm(), pytest.raises(Preempted, match="--resume"):
        _run(CheckpointPolicy(tmp_path / "ck"), term_at_4)  # every=0: no periodic checkpoints
    assert RunCheckpointer(tmp_path / "ck" / "toy_0-9").latest_step() == 4
    out, hist = _run(CheckpointPolicy(tmp_path / "ck", resume=True))
    _assert_same(out, ref)
    assert hist == ref_hist


def test_nan_stops_with_the_last_good_checkpoint_intact(tmp_path):
    def blows_up_at_5(state, const):
        new, m = _toy_step(state, const)
        bad = state.step >= 4
        return new.replace(params=jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new.params)), {
            "loss": jnp.where(bad, jnp.nan, m["loss"])}

    with pytest.raises(FloatingPointError, match="lower the learning rates"):
        _run(CheckpointPolicy(tmp_path / "ck", every=2), step_fn=blows_up_at_5)
    ck = RunCheckpointer(tmp_path / "ck" / "toy_0-9")
    assert ck.latest_step() == 4
    good = ck.restore(_toy_state()).state
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good.params))


def _supervised_step(state, x, y):
    def loss_fn(p):
        return jnp.mean((x.astype(jnp.float32) @ p["w"] - y[:, None]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    upd, opt = TX.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, upd), opt_state=opt, step=state.step + 1), {
        "loss": loss}


def test_fit_resumes_mid_epoch_exactly(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 4)).astype(np.float32), rng.normal(size=50).astype(np.float32)
    state = create_train_state({"params": {"w": jnp.zeros((4, 1))}}, TX, jax.random.key(0))

    def go(policy=None, on_epoch_end=None):
        return fit(_supervised_step, state, x, y, epochs=4, batch_size=10, seed=3, desc="toy-fit",
                   evaluate=lambda s: {"acc": -float(jnp.sum(s.params["w"] ** 2))}, checkpoint=policy,
                   on_epoch_end=on_epoch_end)

    ref_last, ref_best, ref_hist = go()

    def die_in_epoch_3(epoch, s, record):
        if epoch == 2:  # checkpoints at steps 7 and 14 (every 7): the latest is mid-epoch 2
            raise Interrupt

    with pytest.raises(Interrupt):
        go(CheckpointPolicy(tmp_path / "ck", every=7), die_in_epoch_3)
    assert RunCheckpointer(tmp_path / "ck" / "toy-fit_0-20").latest_step() == 7
    last, best, hist = go(CheckpointPolicy(tmp_path / "ck", every=7, resume=True))
    _assert_same(last, ref_last)
    _assert_same(best, ref_best)
    assert hist == ref_hist


# --- The real thing: the CLI's ZSKT job killed with SIGKILL, then SIGTERM, then resumed. ----------

def _cli(workdir: Path, teacher_dir: Path | None, *extra: str) -> subprocess.Popen:
    """The CLI in a subprocess, its stderr in a file (a pipe nobody reads would fill and block it)."""
    cmd = [sys.executable, "-m", "abd_jax.cli", "--config", "experiments/configs/zskt.py:smoke",
           "--workdir", str(workdir), "--config.zskt.pseudo_batches=12", "--config.zskt.eval_every=4",
           "--config.checkpoint_every=1", *extra]
    if teacher_dir is not None:
        cmd.append(f"--config.teacher.dir={teacher_dir}")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ABD_JAX_NO_PROGRESS": "1"}
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir.parent / f"{workdir.name}.{len(list(workdir.parent.glob(workdir.name + '.*')))}.log", "w")
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log_path = Path(log.name)
    return proc


def _stderr(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()[-3000:]


def _wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, at_least: int, timeout: float = 300) -> int:
    phase = workdir / "checkpoints" / "zskt_0-12"
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [int(p.name) for p in phase.glob("*") if p.name.isdigit()] if phase.is_dir() else []
        if steps and max(steps) >= at_least:
            return max(steps)
        assert proc.poll() is None, _stderr(proc)
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_cli_killed_then_preempted_then_resumed_equals_uninterrupted(tmp_path):
    ref = _cli(tmp_path / "ref", None)  # trains the smoke teacher first, then distils
    assert ref.wait() == 0, _stderr(ref)
    teacher = tmp_path / "ref" / "teacher"
    # What the job leaves for a person to read.
    res = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert res["config"]["zskt"]["pseudo_batches"] == 12
    assert all(np.isfinite(res["rows"]["zskt"][k]) for k in ("acc", "asr", "clean_target_rate"))
    assert json.loads((tmp_path / "ref" / "zskt" / "history.json").read_text())[-1]["step"] == 12
    for f in ("zskt/curves.png", "zskt/samples.png", "summary.md", "teacher/teacher.json", "teacher/curves.png"):
        assert (tmp_path / "ref" / f).is_file(), f

    run = tmp_path / "run"
    p = _cli(run, teacher)
    _wait_for_checkpoint(run, p, 3)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    p = _cli(run, teacher, "--resume")
    reached = _wait_for_checkpoint(run, p, 7)
    p.send_signal(signal.SIGTERM)
    assert p.wait() == 143, _stderr(p)
    assert "--resume" in _stderr(p)
    steps = [int(q.name) for q in (run / "checkpoints" / "zskt_0-12").glob("*") if q.name.isdigit()]
    assert max(steps) >= reached  # the SIGTERM checkpoint (at the next step boundary)
    p = _cli(run, teacher, "--resume")
    assert p.wait() == 0, _stderr(p)

    a, b = (json.loads((d / "results.json").read_text())["rows"] for d in (tmp_path / "ref", run))
    assert {k: {m: v for m, v in r.items() if m != "s_per_pseudo_batch"} for k, r in a.items()} == {
        k: {m: v for m, v in r.items() if m != "s_per_pseudo_batch"} for k, r in b.items()}
    ha, hb = (json.loads((d / "zskt" / "history.json").read_text()) for d in (tmp_path / "ref", run))
    assert ha == hb
    _, va, _ = load_teacher(tmp_path / "ref" / "zskt" / "student")
    _, vb, _ = load_teacher(run / "zskt" / "student")
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not (run / "checkpoints").exists()  # discarded once the results are written
