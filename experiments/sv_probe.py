"""Does the Shuffling Vaccine pass verification on the quickstart's teacher, and what does it flag,
for each number of shuffled layers: `python -m experiments.sv_probe --workdir DIR [--seed 0]
[--layers 1 2 3 4 5]`.

Trains (or reuses, from DIR/teacher) the quickstart's poisoned teacher and runs the `--abd` rows'
warm-up once: P = 50 vanilla ZSKT pseudo-batches pooling generator samples, with the keys of
`distill_zskt_ablation`. For each layer count L it then verifies the vaccine that
`--set zskt.sv_layers=L` would start from (the same draws) on that pool (spec 3.4) and reports the
tail ratio of every trial, whether one passed, and what the accepted (or last rejected) shuffle
flags (spec 3.2) on the pool, on the clean test images, on those the teacher calls the target
class, and on the triggered test images. The test images are a diagnosis a defender could not
run. Prints one line per L and appends it to DIR/sv_probe.jsonl (docs/ABD_SV.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from abd_jax.abd.shuffle_vaccine import make_divergence_fn, suspicion_reports, verify_vaccine
from abd_jax.jobs import teacher_and_eval, zskt_config_from
from abd_jax.kd.common import DFKDHooks
from abd_jax.kd.zskt_train import build_zskt, warm_up_pool
from abd_jax.pipeline import normalized_test_images
from abd_jax.report import append_jsonl, percent
from experiments.configs.quickstart import add_abd_settings, get_config


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--smoke", action="store_true", help="the quickstart's seconds-long config")
    args = ap.parse_args(argv)
    cfg = get_config("smoke" if args.smoke else None)
    cfg.seed = args.seed
    add_abd_settings(cfg, args.smoke)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset, eval_sets, teacher, tvars, _ = teacher_and_eval(cfg, workdir)
    zc = zskt_config_from(cfg.zskt)
    zc = dataclasses.replace(zc, sv=True, sr_pseudo_batches=0, sv_verify_after=max(zc.sv_verify_after, 2))
    # The ablation's warm-up: the vanilla step from the SV build's state, keys as distill_zskt_ablation.
    _, _, _, vanilla_step = build_zskt(teacher, dataset, dataclasses.replace(zc, sv=False), args.seed,
                                       DFKDHooks(), tvars)
    _, generator, state, _ = build_zskt(teacher, dataset, zc, args.seed, DFKDHooks(), tvars)
    key = jax.random.key(args.seed + 3)
    _, _, pool_x, pool_t = warm_up_pool(vanilla_step, state, teacher, tvars, generator, zc, key, {})
    divergence = jax.jit(make_divergence_fn(teacher))
    test = normalized_test_images(eval_sets, dataset.mean, dataset.std)
    rows = []
    for layers in args.layers:
        lc = dataclasses.replace(zc, sv_layers=layers)
        start = build_zskt(teacher, dataset, lc, args.seed, DFKDHooks(), tvars)[2].hook_state
        sv, log = verify_vaccine(jax.random.fold_in(key, lc.sv_verify_after), divergence, pool_x, pool_t, start,
                                 n_layers=layers, threshold=lc.sv_verify_threshold)
        rep = suspicion_reports(teacher, tvars, sv, {"pool": pool_x, **test})
        says_target = rep["clean_test"]["teacher_pred"] == eval_sets.target
        row = {"seed": args.seed, "sv_layers": layers, "passed": any(t["passed"] for t in log),
               "tail_ratios_pct": [round(100.0 * t["tail_ratio"], 2) for t in log],
               "flagged_pct": {name: percent(r["mask"]) for name, r in rep.items()},
               "flagged_pct_clean_teacher_says_target": percent(np.asarray(rep["clean_test"]["mask"])[says_target]),
               "flagged_pct_clean_teacher_says_other": percent(np.asarray(rep["clean_test"]["mask"])[~says_target]),
               "pool_size": int(len(pool_x)), "device": jax.devices()[0].device_kind}
        rows.append(row)
        print(json.dumps(row), flush=True)
    append_jsonl(workdir / "sv_probe.jsonl", rows)
    return rows


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation, as the quickstart
    main()
