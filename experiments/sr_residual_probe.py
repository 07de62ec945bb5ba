"""What Self-Retrospection's trigger search can still find after SR: `python -m
experiments.sr_residual_probe --workdir DIR [--seed 0] [--rows zskt zskt+sr] [--rounds 20 50]
[--init-scales 1e-3 0.05] [--train-mode] [--reuse-prefix]`.

SR unlearns whatever universal perturbation delta its search finds (spec 4.1.1), so it can only
remove the part of a backdoor that some delta still fires. DIR is a quickstart `--abd` workdir
(students in DIR/<row>/student, read in the safe format). The probe draws one generator batch at
the pseudo-batch where the SR phase resumes (experiments.sr_sweep's `resume_point`; with
`--reuse-prefix` from DIR/sr_sweep_prefix), and for each trigger model (the teacher, then each
row's student), each R in `--rounds` and each start scale in `--init-scales` synthesizes delta
with the quickstart's search otherwise (its lr, penalty and best-of-n random starts). It then
reports the share of the clean non-target test images that every model (teacher and students)
sends to the target with delta added, overall and per source class, beside each student's ASR
per class with the real trigger. A class where the real trigger still works on the SR student
but no delta does is a residue SR cannot see. With `--train-mode` each student also synthesizes
delta with train-mode BN (batch statistics), as SR's student-made trigger does (spec 4.1: the
student in train mode), judged as before in eval mode.

Prints a table and appends JSON lines to DIR/sr_residual_probe.jsonl. Findings: docs/ABD_SR.md.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from abd_jax.abd.self_retrospection import synthesize_trigger, train_mode_apply
from abd_jax.augment import normalize
from abd_jax.checkpoint import load_teacher
from abd_jax.kd.zskt import sample_images
from abd_jax.report import append_jsonl, percent
from experiments.asr_by_class import by_class
from experiments.sr_sweep import quickstart_sr_fields, resume_point


def target_rates(logits_fn, x: jax.Array, labels: np.ndarray, target: int) -> dict:
    """{"all": percent sent to `target`, "by_class": {class: percent}} of the images x."""
    to_target = np.asarray(jnp.argmax(logits_fn(x), -1)) == target
    return {"all": percent(to_target), "by_class": by_class(to_target, labels)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", nargs="+", default=["zskt", "zskt+sr"])
    ap.add_argument("--rounds", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--init-scales", type=float, nargs="+", default=[1e-3, 0.05])
    ap.add_argument("--train-mode", action="store_true", help="also each student's delta with train-mode BN")
    ap.add_argument("--sr-pseudo-batches", type=int, default=10)
    ap.add_argument("--reuse-prefix", action="store_true", help="as experiments.sr_sweep's (shares its checkpoint)")
    ap.add_argument("--smoke", action="store_true", help="a workdir of `quickstart --smoke --abd`")
    args = ap.parse_args(argv)
    r = resume_point(args.workdir, args.seed, sr_pseudo_batches=args.sr_pseudo_batches, smoke=args.smoke,
                     reuse_prefix=args.reuse_prefix)
    es, ds, workdir = r.eval_sets, r.dataset, Path(args.workdir)
    sr = quickstart_sr_fields(args.smoke)
    restarts = max(1, sr["sr_restarts"])
    labels = es.y_test[es.y_test != es.target]  # the order of the ASR sets
    x_clean = normalize(jnp.asarray(es.x_triggered_clean), ds.mean, ds.std)  # the non-target test images
    x_triggered = normalize(jnp.asarray(es.x_triggered), ds.mean, ds.std)  # the same with the real trigger

    def logits_of(model, variables):  # not jitted on its own: the trigger search traces it inline
        return lambda x: model.apply(variables, x, train=False)[0]

    models = {"teacher": logits_of(r.teacher, r.tvars)}  # the judges (eval mode)
    makers = dict(models)  # the trigger models
    for row in args.rows:
        model, variables, _ = load_teacher(workdir / row / "student", expected_num_classes=ds.num_classes,
                                           expected_image_shape=ds.image_shape)
        models[row] = makers[row] = logits_of(model, variables)
        if args.train_mode:  # every sample carries delta, so BN's batch mean absorbs part of it
            makers[f"{row} (train-mode BN)"] = functools.partial(train_mode_apply(model), variables)
    x_gen = sample_images(r.generator, r.state.generator, jax.random.fold_in(r.state.key, 10**6), r.zc.batch_size,
                          r.zc.z_dim)
    out = []
    for row in args.rows:
        rec = {"kind": "real_trigger", "model": row, "seed": args.seed,
               **target_rates(models[row], x_triggered, labels, es.target)}
        out.append(rec)
        print(f"{row:10s} real trigger: {rec['all']}% {rec['by_class']}")
    for maker, fn in makers.items():
        for rounds in args.rounds:
            for init_scale in args.init_scales:
                delta = synthesize_trigger(fn, x_gen, rounds=rounds, lr=sr["sr_pert_lr"], l2=sr["sr_l2"],
                                           temperature=r.zc.temperature, init_scale=init_scale,
                                           init_key=jax.random.key(0), restarts=restarts)
                rec = {"kind": "delta", "trigger_model": maker, "rounds": rounds, "init_scale": init_scale,
                       "restarts": restarts, "l2_norm": float(jnp.linalg.norm(delta)),
                       "seed": args.seed, "pseudo_batch": r.zc.pseudo_batches - r.zc.sr_pseudo_batches,
                       "target_rate": {judge: target_rates(f, x_clean + delta, labels, es.target)
                                       for judge, f in models.items()}}
                out.append(rec)
                print(f"delta from {maker}, R = {rounds}, start scale {init_scale:g}: |delta| {rec['l2_norm']:.1f}")
                for judge, t in rec["target_rate"].items():
                    print(f"  {judge:10s} sends {t['all']:5.1f}% to the target {t['by_class']}")
    append_jsonl(workdir / "sr_residual_probe.jsonl", out)
    return out


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation, as the quickstart
    main()
