"""Where a quickstart student's backdoor sits: ASR per source class, from the students a quickstart
run saved: `python -m experiments.asr_by_class --workdir DIR [--seed 0] [--rows zskt zskt+sr clean_kd]`.

DIR is a quickstart workdir (`experiments.quickstart --workdir DIR`, or DIR/seed_N of
`quickstart_seeds`): each row's student is read from DIR/<row>/student (the safe checkpoint format,
never unpickled) and judged on the quickstart's test sets (its trigger and target; no teacher is
loaded or trained). For every
source class c != target it prints the share of class-c test images that the student sends to the
target with the trigger (the ASR restricted to c), without it (the clean target rate of c), and
with it among the images whose clean copy the student does not already send to the target (the
part the trigger itself causes), overall and per class, and the clean accuracy (recall) of every
class, the target's included; appends a JSON line per row to
DIR/asr_by_class.jsonl. A one-number ASR hides whether a backdoor
that survives a defense is spread over every class or sits in a few (docs/ABD_SR.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from abd_jax.checkpoint import load_teacher
from abd_jax.jobs import eval_sets_for, load_data
from abd_jax.metrics import batched_predict
from abd_jax.report import append_jsonl, percent
from abd_jax.teacher import make_predict_fn
from experiments.configs.quickstart import get_config


def by_class(values: np.ndarray, labels: np.ndarray, keep: np.ndarray | None = None) -> dict[int, float | None]:
    """{class: percent of True in `values` over that class's samples (and `keep`)}."""
    keep = np.ones_like(values, bool) if keep is None else keep
    return {int(c): percent(values[(labels == c) & keep]) for c in np.unique(labels)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", nargs="+", default=["zskt", "zskt+sr", "clean_kd"])
    ap.add_argument("--smoke", action="store_true", help="a workdir of `quickstart --smoke`")
    args = ap.parse_args(argv)
    cfg = get_config("smoke" if args.smoke else None)
    cfg.seed = args.seed
    workdir = Path(args.workdir)
    dataset = load_data(cfg)
    eval_sets = eval_sets_for(cfg, dataset)
    labels = eval_sets.y_test[eval_sets.y_test != eval_sets.target]  # make_asr_set's order
    out = []
    for row in args.rows:
        model, variables, _ = load_teacher(workdir / row / "student", expected_num_classes=dataset.num_classes,
                                           expected_image_shape=dataset.image_shape)
        predict = make_predict_fn(model, dataset.mean, dataset.std)
        fn = lambda x: predict(variables, x)  # noqa: E731
        to_target = batched_predict(fn, eval_sets.x_triggered) == eval_sets.target
        clean_to_target = batched_predict(fn, eval_sets.x_triggered_clean) == eval_sets.target
        correct = batched_predict(fn, eval_sets.x_test) == eval_sets.y_test  # every test image
        rec = {"row": row, "seed": args.seed, "target": int(eval_sets.target),
               "asr": percent(to_target), "clean_target_rate": percent(clean_to_target),
               # the ASR over images whose clean copy the student does not already send to the target:
               # the part of the ASR the trigger itself causes
               "asr_clean_not_target": percent(to_target[~clean_to_target]),
               "asr_by_class": by_class(to_target, labels),
               "clean_target_rate_by_class": by_class(clean_to_target, labels),
               "asr_clean_not_target_by_class": by_class(to_target, labels, ~clean_to_target),
               "acc": percent(correct), "acc_by_class": by_class(correct, eval_sets.y_test),
               "n_by_class": {int(c): int(np.sum(labels == c)) for c in np.unique(labels)}}
        out.append(rec)
        print(f"{row}: ASR {rec['asr']}%, clean target rate {rec['clean_target_rate']}%, ASR where the clean "
              f"copy is not sent to the target {rec['asr_clean_not_target']}%")
        for name in ("asr_by_class", "clean_target_rate_by_class", "asr_clean_not_target_by_class", "acc_by_class"):
            print(f"  {name:30s}" + "  ".join(f"{c}:{'-' if v is None else v:>5}" for c, v in rec[name].items()))
    append_jsonl(workdir / "asr_by_class.jsonl", out)
    return out


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation, as the quickstart
    main()
