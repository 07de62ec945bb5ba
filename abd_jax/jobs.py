"""Config-driven jobs: the one place where ml_collections configs become keyword arguments.

Each job writes into its work directory: `results.json`, `summary.md`, PNG plots and its model
checkpoints (the safe Orbax format of `abd_jax.checkpoint`). Jobs never overwrite a finished
teacher: a teacher directory whose fingerprint matches the config is reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from abd_jax.abd.shuffle_vaccine import summarize_reports
from abd_jax.checkpoint import CheckpointError, load_teacher, read_teacher_meta, save_teacher
from abd_jax.data import load_dataset
from abd_jax.kd.clean import distill_clean
from abd_jax.kd.zskt_train import ZSKTConfig, distill_zskt, distill_zskt_ablation
from abd_jax.machine import machine_info
from abd_jax.methods import METHODS, distill, get_method, method_config, with_abd
from abd_jax.pipeline import EvalSets, make_eval_sets, poison, train_classifier
from abd_jax.resume import CheckpointPolicy
from abd_jax.report import markdown_table, plot_curves, plot_histograms, save_image_grid, write_json, write_text
from abd_jax.attacks import make_trigger

PCT = ("acc", "asr", "clean_target_rate")
CHECKPOINT_DIR = "checkpoints"


def checkpoint_policy(cfg, workdir: str | Path, resume: bool = False) -> CheckpointPolicy:
    """Checkpoints of a job under WORKDIR/checkpoints, every `cfg.checkpoint_every` steps of each
    phase (teacher batches, pseudo-batches, clean-KD batches; 0: only at each phase's end and on
    SIGTERM). `resume` continues from them (abd_jax.resume)."""
    return CheckpointPolicy(Path(workdir) / CHECKPOINT_DIR, every=int(cfg.get("checkpoint_every", 0)), resume=resume)


def discard_checkpoints(policy: CheckpointPolicy | None) -> None:
    """After a job has written its results and models, its run checkpoints are no longer needed
    (and a later run in the same work directory would otherwise have to pass --resume)."""
    if policy is not None:
        shutil.rmtree(policy.directory, ignore_errors=True)


def load_data(cfg) -> Any:
    return load_dataset(cfg.data.name, image_size=cfg.data.image_size, data_dir=cfg.data.data_dir or None)


def teacher_fingerprint(cfg) -> str:
    """A hash of everything that determines the teacher, so a stale teacher is never reused."""
    blob = json.dumps(
        {"data": cfg.data.to_dict(), "attack": cfg.attack.to_dict(),
         "teacher": {k: v for k, v in cfg.teacher.to_dict().items() if k != "dir"}, "seed": cfg.seed},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _curves(history: list[dict], x_key: str) -> dict[str, list[tuple[float, float]]]:
    return {
        name: [(h[x_key], h[k]) for h in history if k in h]
        for name, k in (("Acc", "acc"), ("ASR", "asr"), ("clean target rate", "clean_target_rate"))
    }


def _pct(m: dict) -> dict[str, float]:
    return {k: round(float(m[k]), 2) for k in PCT if k in m}


def _training_kwargs(cfg, dataset) -> dict[str, Any]:
    """The teacher config as `train_classifier` keywords (shared by the teacher and CL's clean model)."""
    t = cfg.teacher
    return dict(model_name=t.model, num_classes=dataset.num_classes, mean=dataset.mean, std=dataset.std,
                epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr,
                weight_decay=t.weight_decay, flip=cfg.data.flip)


def run_teacher(cfg, workdir: str | Path, dataset=None, checkpoint: CheckpointPolicy | None = None,
                mesh: Mesh | None = None) -> dict[str, Any]:
    """Trains (or reuses) the poisoned teacher into WORKDIR/teacher; returns its metrics.

    `dataset` is loaded from the config when not given; a reused teacher needs none.
    """
    workdir = Path(workdir)
    tdir = workdir / "teacher"
    fp = teacher_fingerprint(cfg)
    try:
        meta = read_teacher_meta(tdir)
        if meta.get("fingerprint") == fp:
            print(f"reusing the teacher in {tdir} (same config)")
            return meta
    except CheckpointError:
        pass
    dataset = load_data(cfg) if dataset is None else dataset
    clean_model = None
    if cfg.attack.trigger == "cl":  # CL perturbs target images against a clean model (spec 7)
        clean_model = train_classifier(
            dataset.x_train, dataset.y_train, eval_sets=None, seed=cfg.seed + 1, desc="clean model",
            checkpoint=checkpoint, mesh=mesh, **_training_kwargs(cfg, dataset),
        )
    t0 = time.time()
    _, poisoned, eval_sets = poison(
        dataset, trigger_name=cfg.attack.trigger, target=cfg.attack.target, ratio=cfg.attack.ratio,
        holdout=cfg.attack.holdout, trigger_seed=cfg.attack.trigger_seed,
        pattern_file=cfg.attack.pattern_file or None, clean_model=clean_model, seed=cfg.seed,
    )
    trained = train_classifier(
        poisoned.x_train, poisoned.y_train, eval_sets=eval_sets, seed=cfg.seed,
        eval_every=cfg.teacher.eval_every, checkpoint=checkpoint, mesh=mesh, **_training_kwargs(cfg, dataset),
    )
    wall = time.time() - t0
    meta = {
        "model": cfg.teacher.model, "num_classes": dataset.num_classes,
        "image_shape": list(dataset.image_shape), "dataset": dataset.name, "trigger": cfg.attack.trigger,
        "target": cfg.attack.target, "num_poisoned": poisoned.num_poisoned, "fingerprint": fp,
        **_pct(trained.metrics), "train_wall_s": round(wall, 1), "seed": cfg.seed,
    }
    save_teacher(tdir, trained.variables, meta)
    write_json(tdir / "history.json", trained.history)
    plot_curves(tdir / "curves.png", _curves(trained.history, "epoch"), xlabel="epoch",
                title=f"teacher {cfg.teacher.model}, {cfg.attack.trigger}")
    return meta


def teacher_and_eval(cfg, workdir: str | Path, checkpoint: CheckpointPolicy | None = None, mesh: Mesh | None = None):
    """The teacher (trained or reused) with the dataset and the evaluation sets it is judged on."""
    workdir = Path(workdir)
    dataset = load_data(cfg)
    if cfg.teacher.dir:
        tdir = Path(cfg.teacher.dir)
    else:
        run_teacher(cfg, workdir, dataset, checkpoint, mesh)
        tdir = workdir / "teacher"
    teacher, tvars, meta = load_teacher(tdir, expected_num_classes=dataset.num_classes,
                                        expected_image_shape=dataset.image_shape)
    return dataset, eval_sets_for(cfg, dataset), teacher, tvars, meta


def eval_sets_for(cfg, dataset) -> EvalSets:
    """The evaluation sets of the job's attack (trigger, target) on `dataset`: no teacher needed."""
    trigger = make_trigger(cfg.attack.trigger, dataset.image_shape[0], dataset.image_shape[2],
                           seed=cfg.attack.trigger_seed, pattern_file=cfg.attack.pattern_file or None)
    return make_eval_sets(dataset, trigger, cfg.attack.target)


def zskt_config_from(c) -> ZSKTConfig:
    return method_config("zskt", c)


def save_distill_result(out: Path, res, student: str, dataset, name: str,
                        step_label: str = "pseudo-batch") -> dict[str, Any]:
    """Student checkpoint, history, curves and synthetic samples of one data-free KD row (any
    method of abd_jax.methods); returns the row."""
    final = _pct(res.history[-1])
    save_teacher(out / "student", res.state.student.variables,
                 {"model": student, "num_classes": dataset.num_classes,
                  "image_shape": list(dataset.image_shape), **final})
    write_json(out / "history.json", res.history)
    plot_curves(out / "curves.png", _curves(res.history, "step"), xlabel=step_label,
                title=f"{name}: student {student}")
    save_image_grid(out / "samples.png", res.samples)
    if res.suspicion is not None:
        save_suspicion_report(out, res.suspicion, name)
    row = {**final, "s_per_pseudo_batch": round(res.seconds_per_step, 3)}
    if res.sv_verification is not None:
        write_json(out / "sv_verification.json", res.sv_verification)
        row["sv_vaccine"] = "accepted" if any(r["passed"] for r in res.sv_verification) else "rejected"
    return row


def save_suspicion_report(out: Path, reports: dict[str, dict[str, np.ndarray]], name: str) -> None:
    """suspicion.npz (per sample: teacher_pred, shuffled_pred, divergence, mask, per batch),
    suspicion.json (flagged % and mean log10 divergences per batch) and suspicion.png (the
    divergence distributions of flagged and unflagged samples)."""
    np.savez(out / "suspicion.npz", **{f"{batch}/{field}": v for batch, r in reports.items() for field, v in r.items()})
    write_json(out / "suspicion.json", summarize_reports(reports))

    def log_kl(r, keep=None):
        d = r["divergence"] if keep is None else r["divergence"][keep]
        return np.log10(np.maximum(d, 1e-30))

    series = {f"{batch} (all)": log_kl(r) for batch, r in reports.items() if batch != "synthetic"}
    if "synthetic" in reports:
        syn = reports["synthetic"]
        series = {"synthetic flagged": log_kl(syn, syn["mask"]), "synthetic unflagged": log_kl(syn, ~syn["mask"]),
                  **series}
    plot_histograms(out / "suspicion.png", series, xlabel="log10 KL(teacher || shuffled) / C",
                    title=f"{name}: what the vaccine flags")


def run_zskt(cfg, workdir: str | Path, *, name: str = "zskt", dataset=None, eval_sets: EvalSets | None = None,
             teacher=None, tvars=None, checkpoint: CheckpointPolicy | None = None,
             mesh: Mesh | None = None) -> dict[str, Any]:
    """ZSKT distillation of the teacher into WORKDIR/NAME; returns {"acc", "asr", ...}."""
    workdir = Path(workdir)
    if teacher is None:
        dataset, eval_sets, teacher, tvars, _ = teacher_and_eval(cfg, workdir, checkpoint, mesh)
    res = distill_zskt(teacher, tvars, dataset, eval_sets, zskt_config_from(cfg.zskt), seed=cfg.seed, desc=name,
                       checkpoint=checkpoint, mesh=mesh)
    return save_distill_result(workdir / name, res, cfg.zskt.student, dataset, name)


def run_zskt_abd(cfg, workdir: str | Path, *, dataset, eval_sets, teacher, tvars,
                 checkpoint: CheckpointPolicy | None = None, mesh: Mesh | None = None) -> dict[str, dict]:
    """The four ZSKT rows of the ABD ablation (spec 9.4), `distill_zskt_ablation`: zskt, zskt+sr
    (SR over the last `sr_pseudo_batches`), zskt+sv and zskt+abd. With vaccine verification the SV
    rows record whether the vaccine was accepted; a rejected vaccine leaves SV off, and those rows
    are then the vanilla rows."""
    workdir = Path(workdir)
    results = distill_zskt_ablation(teacher, tvars, dataset, eval_sets, zskt_config_from(cfg.zskt), seed=cfg.seed,
                                    checkpoint=checkpoint, mesh=mesh)
    return {name: save_distill_result(workdir / name, res, cfg.zskt.student, dataset, name)
            for name, res in results.items()}


def run_method(cfg, workdir: str | Path, method: str, *, name: str | None = None,
               abd_parts: tuple[str, ...] | None = None, dataset=None, eval_sets: EvalSets | None = None,
               teacher=None, tvars=None, checkpoint: CheckpointPolicy | None = None,
               mesh: Mesh | None = None) -> dict[str, Any]:
    """Data-free KD with any method of `abd_jax.methods` (its settings from the config section it
    reads) into WORKDIR/NAME; returns the row {"acc", "asr", ...}.

    `abd_parts`: None runs the config as written; () forces the vanilla method (SV and SR off);
    ("sv", "sr") or a subset switches those ABD parts on (`methods.with_abd`).
    """
    workdir = Path(workdir)
    m = get_method(method)
    name = name or method
    if teacher is None:
        dataset, eval_sets, teacher, tvars, _ = teacher_and_eval(cfg, workdir, checkpoint, mesh)
    mcfg = method_config(method, cfg[m.section])
    if abd_parts is not None:
        # The SR phase's length when +ABD switches SR on: `cfg.abd.sr_steps` where the config has
        # one (the method configs do), else the length already in the method's section.
        sr_steps = cfg.abd.sr_steps if "abd" in cfg else None
        mcfg = with_abd(method, mcfg, tuple(abd_parts), sr_steps=sr_steps)
    res = distill(method, teacher, tvars, dataset, eval_sets, mcfg, seed=cfg.seed, desc=name,
                  checkpoint=checkpoint, mesh=mesh)
    return save_distill_result(workdir / name, res, mcfg.student, dataset, name, m.step_label)


def run_clean_kd(cfg, workdir: str | Path, *, dataset=None, eval_sets=None, teacher=None, tvars=None,
                 checkpoint: CheckpointPolicy | None = None, mesh: Mesh | None = None) -> dict[str, Any]:
    """Clean-data KD baseline into WORKDIR/clean_kd; returns {"acc", "asr", ...}."""
    workdir = Path(workdir)
    if teacher is None:
        dataset, eval_sets, teacher, tvars, _ = teacher_and_eval(cfg, workdir, checkpoint, mesh)
    c = cfg.clean_kd
    res = distill_clean(teacher, tvars, dataset, eval_sets, student=c.student, fraction=c.fraction,
                        epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                        temperature=c.temperature, alpha=c.alpha, flip=cfg.data.flip, seed=cfg.seed,
                        eval_every=c.eval_every, checkpoint=checkpoint, mesh=mesh)
    out = workdir / "clean_kd"
    final = _pct(res.metrics)
    save_teacher(out / "student", res.variables,
                 {"model": c.student, "num_classes": dataset.num_classes,
                  "image_shape": list(dataset.image_shape), **final})
    write_json(out / "history.json", res.history)
    plot_curves(out / "curves.png", _curves(res.history, "epoch"), xlabel="epoch", title="clean KD")
    return final


def results_table(teacher: dict, rows: dict[str, dict]) -> str:
    header = ["model", "Acc %", "ASR %", "clean target rate %"]
    body = [["Teacher", teacher.get("acc"), teacher.get("asr"), teacher.get("clean_target_rate")]]
    body += [[name, r.get("acc"), r.get("asr"), r.get("clean_target_rate")] for name, r in rows.items()]
    table = markdown_table(header, body)
    rejected = [name for name, r in rows.items() if r.get("sv_vaccine") == "rejected"]
    if rejected:  # spec 3.4: no shuffle passed the tail-ratio test, so SV stayed off
        table += (f"\n{', '.join(rejected)}: the vaccine failed verification (spec 3.4), SV stayed off, "
                  "so these rows equal the runs without SV.\n")
    return table


def write_results(workdir: Path, cfg, teacher: dict, rows: dict[str, dict], wall_s: float, title: str) -> str:
    """results.json + summary.md; returns the markdown table."""
    table = results_table(teacher, rows)
    machine = machine_info()
    write_json(workdir / "results.json", {
        "teacher": _pct(teacher), "rows": rows, "seed": cfg.seed, "wall_s": round(wall_s, 1),
        "device": machine["device"], "machine": machine, "config": cfg.to_dict(),
    })
    write_text(workdir / "summary.md", f"# {title}\n\n{table}\nseed {cfg.seed}, {wall_s:.0f} s on "
               f"{machine['device']} ({machine['cpu']}). Machine and config in results.json.\n")
    return table


def run_job(cfg, workdir: str | Path, *, resume: bool = False, mesh: Mesh | None = None) -> dict[str, Any]:
    """Dispatches on `cfg.job`: "teacher", "clean_kd" or a data-free KD method of abd_jax.methods
    ("zskt", "dfad", "dafl", "cmi", "deepinversion", "ood"). Checkpoints into
    WORKDIR/checkpoints (see `checkpoint_policy`); `resume` continues an interrupted job exactly;
    `mesh`: data parallelism over a device mesh (abd_jax.parallel.data_mesh)."""
    workdir = Path(workdir)
    jobs = {"zskt": run_zskt, "clean_kd": run_clean_kd,
            **{m: (lambda c, w, _m=m, **kw: run_method(c, w, _m, **kw)) for m in METHODS if m != "zskt"}}
    if cfg.job == "quickstart":
        raise ValueError("the quickstart config is run by its own command: python -m experiments.quickstart "
                         "--workdir DIR")
    if cfg.job not in ("teacher", *jobs):
        raise ValueError(f"unknown job {cfg.job!r}; set --config.job to one of: teacher, {', '.join(jobs)}")
    workdir.mkdir(parents=True, exist_ok=True)
    policy = checkpoint_policy(cfg, workdir, resume)
    t0 = time.time()
    if cfg.job == "teacher":
        meta = run_teacher(cfg, workdir, checkpoint=policy, mesh=mesh)
        write_results(workdir, cfg, meta, {}, time.time() - t0, "Poisoned teacher")
        discard_checkpoints(policy)
        return meta
    dataset, eval_sets, teacher, tvars, meta = teacher_and_eval(cfg, workdir, policy, mesh)
    row = jobs[cfg.job](cfg, workdir, dataset=dataset, eval_sets=eval_sets, teacher=teacher, tvars=tvars,
                        checkpoint=policy, mesh=mesh)
    write_results(workdir, cfg, meta, {cfg.job: row}, time.time() - t0, f"{cfg.job} distillation")
    discard_checkpoints(policy)
    return row
