"""Sweep ZSKT settings on the embedded digits: which settings learn, and which transfer the backdoor.

    python -m experiments.zskt_sweep --out sweep.json "n=300" "n=1000,seed=1" "n=1000,size=32"

Each positional argument is one run: comma-separated overrides of the defaults below. The teacher
for each (size, trigger, teacher) is trained once (WRN-16-2 unless `teacher=`, 30 epochs, BadNets-grid unless overridden) and
reused. Prints one JSON line per run (final and peak Acc/ASR, time per pseudo-batch) and appends it
to --out. This is the script behind the findings in docs/ZSKT.md.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from abd_jax.data.embedded import load_digits
from abd_jax.kd.zskt_train import ZSKTConfig, distill_zskt
from abd_jax.pipeline import poison, train_classifier

ALIASES = {"n": "pseudo_batches", "nst": "n_student_steps", "lrs": "lr_student", "lrg": "lr_generator", "tau": "temperature"}
DEFAULTS = dict(size=16, trigger="badnets_grid", seed=0, teacher_epochs=30, teacher="wrn16_2")


def parse(spec: str) -> dict:
    out: dict = {}
    for part in filter(None, spec.split(",")):
        k, v = part.split("=")
        k = ALIASES.get(k, k)
        out[k] = json.loads(v) if v[:1] in "0123456789-[{.tf" and v not in ("tanh",) else v
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default="zskt_sweep.json")
    args = ap.parse_args()
    teachers: dict = {}
    for spec in args.runs:
        o = {**DEFAULTS, **parse(spec)}
        tkey = (o["size"], o["trigger"], o["teacher"])
        if tkey not in teachers:
            ds = load_digits(o["size"])
            _, p, ev = poison(ds, trigger_name=o["trigger"], target=0)
            t0 = time.time()
            r = train_classifier(p.x_train, p.y_train, model_name=o["teacher"], num_classes=10,
                                 mean=ds.mean, std=ds.std, eval_sets=ev, epochs=o["teacher_epochs"],
                                 eval_every=10, flip=False, desc="teacher")
            teachers[tkey] = (ds, ev, r)
            print(json.dumps({"teacher": list(tkey), **r.metrics, "wall_s": time.time() - t0}), flush=True)
        ds, ev, r = teachers[tkey]
        cfg_kw = {k: v for k, v in o.items() if k not in DEFAULTS}
        cfg = ZSKTConfig(**cfg_kw)
        t0 = time.time()
        res = distill_zskt(r.model, r.variables, ds, ev, cfg, seed=o["seed"])
        hist = res.history
        line = {"spec": spec, "final": {k: hist[-1][k] for k in ("acc", "asr", "clean_target_rate")},
                "peak_acc": max(h["acc"] for h in hist), "max_asr": max(h["asr"] for h in hist),
                "s_per_pb": res.seconds_per_step, "wall_s": time.time() - t0,
                "curve": [(h["step"], round(h["acc"], 1), round(h["asr"], 1)) for h in hist],
                "device": jax.devices()[0].device_kind}
        print(json.dumps(line), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    main()
