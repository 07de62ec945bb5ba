"""Teacher Acc / ASR for every implemented trigger on the embedded digits.

    python -m experiments.teacher_table --workdir runs/teacher_table [--image-size 16] [--epochs 30]

Trains one poisoned WRN-16-2 teacher per trigger (the teacher config of experiments/configs/
teacher.py, seed 0) and writes WORKDIR/teacher_table.md and WORKDIR/teacher_table.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from abd_jax.attacks import TRIGGER_NAMES
from abd_jax.jobs import run_teacher
from abd_jax.report import markdown_table, write_json, write_text
from experiments.configs.teacher import get_config


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--triggers", nargs="*", default=list(TRIGGER_NAMES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows, out = [], {}
    for name in args.triggers:
        cfg = get_config()
        cfg.attack.trigger = name
        cfg.data.image_size = args.image_size
        cfg.teacher.epochs = args.epochs
        cfg.seed = args.seed
        t0 = time.time()
        meta = run_teacher(cfg, Path(args.workdir) / name)
        out[name] = {k: meta[k] for k in ("acc", "asr", "clean_target_rate", "num_poisoned")}
        out[name]["wall_s"] = meta.get("train_wall_s", round(time.time() - t0, 1))
        rows.append([name, meta["acc"], meta["asr"], meta["clean_target_rate"], meta["num_poisoned"], out[name]["wall_s"]])
        print(rows[-1], flush=True)
    table = markdown_table(["trigger", "Acc %", "ASR %", "clean target rate %", "poisoned images", "train s"], rows)
    write_json(Path(args.workdir) / "teacher_table.json", out)
    write_text(Path(args.workdir) / "teacher_table.md", table)
    print(table)


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    main()
