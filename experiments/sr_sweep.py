"""Self-Retrospection settings on the quickstart: `python -m experiments.sr_sweep --workdir DIR
[--seed 0] [--sv] [--reuse-prefix] [--base spec|quickstart] [--variants "portion=0.02" "portion=0.5,rounds=20" ...]`.

Trains (or reuses, from DIR/teacher) the quickstart's poisoned teacher, runs the quickstart's ZSKT
(with `--sv` the ZSKT+SV run) up to pseudo-batch N - k once, then resumes it with SR once per
variant (each a comma-separated list of `ZSKTConfig` fields, the SR ones without their sr_ prefix
if you like; e.g. lr_generator=0 freezes the generator during SR, bn_replay=true replays the SR
forwards' BN running-stat updates), and prints
and appends to DIR/sr_sweep.jsonl the final Acc / ASR / clean target rate of each, beside the
plain (no-SR) ending, with the ASR after every SR pseudo-batch (`asr_curve`: one final number
hides how much it moves) and how much the trigger SR starts from is the teacher's backdoor
(`trigger_*_target_rate`). Used to choose the quickstart's SR setting (docs/ABD_SR.md).

Each variant changes the SR fields of a base: `--base spec` (the default, which the commands in
docs/ABD_SR.md were run with) is the spec's SR defaults (zero start, weight 1, resume lr 5e-4);
`--base quickstart` is what the quickstart's `--abd` rows use (`quickstart_sr_fields`), so
"rounds=20" there means the quickstart's setting with R = 20. Rows record their base.

`--reuse-prefix` checkpoints the state at pseudo-batch N - k under DIR/sr_sweep_prefix/ and restores
it on the next call (a later sweep skips the ~6 minutes of prefix); delete that directory after a
change of code or config, since the checkpoint does not know which made it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace

import jax

import jax.numpy as jnp
import numpy as np

from abd_jax.augment import normalize
from abd_jax.jobs import teacher_and_eval, zskt_config_from
from abd_jax.kd.common import DFKDHooks
from abd_jax.kd.loop import run_steps
from abd_jax.kd.zskt import sample_images
from abd_jax.kd.zskt_train import ZSKTConfig, build_zskt, memory_pool, sr_hook, sr_phase
from abd_jax.machine import machine_info
from abd_jax.pipeline import EvalSets, evaluator
from abd_jax.resume import CheckpointPolicy
from experiments.configs.quickstart import add_abd_settings, get_config
from experiments.overrides import parse_fields


def parse_variant(spec: str) -> dict:
    """"portion=0.5,rounds=20" -> {"sr_portion": 0.5, "sr_rounds": 20}; a key that names a
    `ZSKTConfig` field is kept as it is ("lr_generator=0": the generator frozen during SR)."""
    return parse_fields(list(filter(None, spec.split(","))), ZSKTConfig, "--variants", prefix="sr_")


def base_config(base: str, smoke: bool = False):
    """The quickstart job config, with the `--abd` rows' settings for base "quickstart"."""
    cfg = get_config("smoke" if smoke else None)
    if base == "quickstart":
        add_abd_settings(cfg, smoke)
    return cfg


def quickstart_sr_fields(smoke: bool = False) -> dict:
    """The SR fields (ZSKTConfig names) the quickstart's `--abd` rows set, apart from the SR
    phase's length and memory size (both shape the prefix): the base of `--base quickstart`."""
    zc = zskt_config_from(base_config("quickstart", smoke).zskt)
    return {f.name: getattr(zc, f.name) for f in dataclasses.fields(zc)
            if f.name.startswith("sr_") and f.name not in ("sr_pseudo_batches", "sr_memory")}


def trigger_target_rates(teacher, tvars, student, s_vars, x_gen: jax.Array, eval_sets: EvalSets, mean, std,
                         cfg: ZSKTConfig) -> dict[str, float]:
    """How much of the backdoor the teacher-made SR trigger carries (percent): synthesized as SR's
    `student_sr_prepare` does, from the generator batch `x_gen`, then added to the evaluation's clean
    non-target images; the share of them the teacher (and the student) then send to the target.
    The real trigger sends the teacher's 100% there; clean images about 0-2%."""
    _, prepare, _ = sr_hook(teacher, student, cfg)  # the SR phase's own trigger synthesis
    delta = prepare(tvars, x_gen, None, s_vars)
    x = normalize(jnp.asarray(eval_sets.x_triggered_clean), mean, std) + delta
    rates = {}
    for name, model, variables in (("teacher", teacher, tvars), ("student", student, s_vars)):
        pred = np.asarray(jnp.argmax(model.apply(variables, x, train=False)[0], -1))
        rates[f"trigger_{name}_target_rate"] = float(100.0 * np.mean(pred == eval_sets.target))
    rates["trigger_l2_norm"] = float(jnp.linalg.norm(delta))
    return rates


def resume_point(workdir: str | Path, seed: int, *, sv: bool = False, sr_pseudo_batches: int = 10,
                 smoke: bool = False, reuse_prefix: bool = False, memory: int = 0,
                 memory_from: int = 0) -> SimpleNamespace:
    """The quickstart's teacher (trained or reused from DIR/teacher) and its ZSKT run (with `sv` the
    ZSKT+SV run) at pseudo-batch N - k, where an SR phase of k pseudo-batches would resume it; with
    `reuse_prefix` checkpointed in / restored from DIR/sr_sweep_prefix. With `memory` > 0 the SR
    memory (`zskt_train.memory_pool`) is pooled from pseudo-batch `memory_from` on, with the key the
    quickstart uses. Returns a namespace with cfg (the job config), dataset, eval_sets, teacher,
    tvars, zc (the ZSKTConfig), student, generator, state, step, workdir, memory (None without one)."""
    cfg = get_config("smoke" if smoke else None)
    if smoke:
        sr_pseudo_batches = 1
        cfg.zskt.sr_rounds, cfg.zskt.sr_fp_iterations = 2, 1
    cfg.seed = seed
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset, eval_sets, teacher, tvars, _ = teacher_and_eval(cfg, workdir)
    zc = dataclasses.replace(zskt_config_from(cfg.zskt), sv=sv, sr_pseudo_batches=sr_pseudo_batches,
                             sr_memory=memory)
    student, generator, state, step = build_zskt(teacher, dataset, zc, seed, DFKDHooks(), tvars)
    main_steps = zc.pseudo_batches - zc.sr_pseudo_batches
    pool, collect = memory_pool(generator, zc, seed, memory_from, main_steps, state.generator)
    ckpt = None
    if reuse_prefix:  # a prefix with a memory has its own directory: its checkpoint holds the pool
        tag = f"{'sv' if sv else 'vanilla'}_k{zc.sr_pseudo_batches}" + (f"_mem{memory}_from{memory_from}" if memory else "")
        ckpt = CheckpointPolicy(workdir / "sr_sweep_prefix" / tag, resume=True)
    state, _ = run_steps(step, state, tvars, num_steps=main_steps, desc="prefix", checkpoint=ckpt,
                         on_step=collect, host_state=pool)
    return SimpleNamespace(cfg=cfg, dataset=dataset, eval_sets=eval_sets, teacher=teacher, tvars=tvars, zc=zc,
                           student=student, generator=generator, state=state, step=step, workdir=workdir,
                           memory=pool["x"] if pool is not None else None)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sv", action="store_true", help="resume the ZSKT+SV run instead of vanilla ZSKT")
    ap.add_argument("--sr-pseudo-batches", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=["portion=0.02"])
    ap.add_argument("--reuse-prefix", action="store_true",
                    help="checkpoint the state at pseudo-batch N - k in DIR/sr_sweep_prefix and restore it next time")
    ap.add_argument("--smoke", action="store_true", help="the quickstart's seconds-long config (1 SR pseudo-batch)")
    ap.add_argument("--base", choices=("spec", "quickstart"), default="spec",
                    help="what the variants change: the spec's SR defaults, or the quickstart's --abd SR setting")
    ap.add_argument("--memory", type=int, default=None,
                    help="pool this many generator samples over the prefix for the SR phase (ZSKTConfig.sr_memory; "
                         "with --base quickstart from pseudo-batch 50, after its vaccine warm-up, as the quickstart); "
                         "a variant uses them when its memory_share > 0. Default: the base's sr_memory")
    args = ap.parse_args(argv)
    base = zskt_config_from(base_config(args.base, args.smoke).zskt)
    if args.memory is None:
        args.memory = base.sr_memory
    # Pooled from where the base's main run pools it: after its vaccine warm-up, if it has one.
    memory_from = base.sv_verify_after
    r = resume_point(args.workdir, args.seed, sv=args.sv, sr_pseudo_batches=args.sr_pseudo_batches,
                     smoke=args.smoke, reuse_prefix=args.reuse_prefix, memory=args.memory, memory_from=memory_from)
    dataset, eval_sets, teacher, tvars, zc = r.dataset, r.eval_sets, r.teacher, r.tvars, r.zc
    if args.base == "quickstart":  # SR fields only: the run up to the resume point is the same
        zc = dataclasses.replace(zc, **quickstart_sr_fields(args.smoke))
    student, generator, state, step, workdir = r.student, r.generator, r.state, r.step, r.workdir
    ev = evaluator(student, dataset.mean, dataset.std, eval_sets)
    evaluate = lambda s: ev(s.student.variables)  # noqa: E731
    main_steps = zc.pseudo_batches - zc.sr_pseudo_batches
    x_gen = sample_images(generator, state.generator, jax.random.fold_in(state.key, 10**6), zc.batch_size, zc.z_dim)
    _, plain = run_steps(step, state, tvars, num_steps=zc.pseudo_batches, start_step=main_steps,
                         evaluate=evaluate, eval_every=1, desc="plain")
    rows = [{"variant": "plain (no SR)", **plain[-1], "asr_curve": [round(h["asr"], 1) for h in plain]}]
    hooks = DFKDHooks()
    if args.sv:
        from abd_jax.kd.zskt_train import with_sv_penalty

        hooks = with_sv_penalty(hooks, teacher, zc)
    for spec in args.variants:
        vc = dataclasses.replace(zc, **parse_variant(spec))
        rates = trigger_target_rates(teacher, tvars, student, state.student.variables, x_gen, eval_sets,
                                     dataset.mean, dataset.std, vc) if vc.sr_trigger_model == "teacher" else {}
        t0 = time.perf_counter()
        memory = r.memory if vc.sr_memory and vc.sr_memory_share > 0 else None
        sr_state, sr_step = sr_phase(teacher, student, generator, state, vc, hooks, memory=memory)
        _, hist = run_steps(sr_step, sr_state, tvars, num_steps=vc.pseudo_batches, start_step=main_steps,
                            evaluate=evaluate, eval_every=1, desc=f"SR {spec}", jit_step=vc.sr_fuse != "host")
        rows.append({"variant": spec, **hist[-1], "seconds": round(time.perf_counter() - t0, 1),
                     "asr_curve": [round(h["asr"], 1) for h in hist], **rates})
    machine = machine_info()
    with open(workdir / "sr_sweep.jsonl", "a") as f:
        for row in rows:
            row = {**row, "seed": args.seed, "sv": args.sv, "base": args.base, "sr_pseudo_batches": zc.sr_pseudo_batches,
                   "memory": args.memory, **machine}
            f.write(json.dumps(row) + "\n")
            print(f"{row['variant']:40s} acc {row['acc']:5.1f}  asr {row['asr']:5.1f}  ctr {row['clean_target_rate']:5.1f}")
    return rows


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    main()
