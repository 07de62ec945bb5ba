"""What Self-Retrospection's trigger synthesis finds on the quickstart: `python -m
experiments.sr_trigger_probe --workdir DIR [--seed 0] [--rounds 10 30] [--batches 3] [--starts 3]
[--init-scale 1e-3] [--reuse-prefix]`.

SR unlearns the universal perturbation delta that moves the model most on a synthetic batch (spec
4.1.1: from zero, Adam at lr 0.1 for R rounds on -KL(M(x) || M(x + delta)) + 1e-3 ||delta||^2, M the
teacher). It helps against a backdoor only if that delta is the backdoor's trigger, or close to it.
This probe takes the state an SR phase would resume (experiments.sr_sweep's `resume_point`),
draws generator batches, synthesizes delta on each as the quickstart's SR does (from the spec's
zero start, and from `--starts` random starts at `--init-scale`), and reports:

- the teacher's class histogram on the batch, on batch + delta, and on the clean non-target test
  images + delta (a trigger-like delta sends the last to the target class);
- the synthesis objective's KL for delta and for the real trigger pasted into the same batch (the
  stamp / blend triggers), i.e. whether the objective itself prefers the trigger;
- the objective's gradient at delta = 0 (where the spec's search starts) and the real trigger's
  size in the same units as delta.

Prints a summary and writes DIR/sr_trigger_probe.json. Findings: docs/ABD_SR.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from abd_jax.abd.self_retrospection import kl_divergence, synthesize_trigger
from abd_jax.attacks.triggers import Trigger, apply_trigger_unclipped, make_trigger
from abd_jax.augment import normalize
from abd_jax.kd.zskt import sample_images
from experiments.sr_sweep import resume_point


def paste_trigger(x: jax.Array, trigger: Trigger, mean, std) -> jax.Array | None:
    """The stamp / blend trigger applied to normalized images without clipping them to pixel range
    (generator images are not in it): x + alpha * mask * (normalize(pattern) - x). None for other
    trigger modes."""
    if trigger.mode not in ("stamp", "blend"):
        return None
    # The trigger's own formula (affine in the image for these modes), with the pattern normalized.
    return apply_trigger_unclipped(x, trigger.replace(pattern=normalize(jnp.asarray(trigger.pattern)[None], mean, std)[0]))


def histogram(logits: jax.Array, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(jnp.argmax(logits, -1)), minlength=num_classes).tolist()


def probe_batch(teacher_logits, x: jax.Array, x_clean: jax.Array, target: int, num_classes: int,
                rounds: list[int], *, lr: float, l2: float, temperature: float,
                x_triggered: jax.Array | None, init_scale: float, starts: int) -> dict:
    """One generator batch: the teacher's classes on it, and per R and start (the spec's zero start,
    then `starts` random starts at `init_scale`, keys 1..starts) what delta does (see module doc)."""
    clean = teacher_logits(x)
    # The objective's gradient where the spec's search starts (delta = 0): zero up to rounding.
    at_zero = jax.grad(lambda d: kl_divergence(clean, teacher_logits(x + d), temperature))(jnp.zeros_like(x[:1]))
    out = {"batch_hist": histogram(clean, num_classes), "grad_at_zero_max_abs": float(jnp.max(jnp.abs(at_zero)))}
    if x_triggered is not None:
        out["real_trigger_kl"] = float(kl_divergence(clean, teacher_logits(x_triggered), temperature))
        out["real_trigger_batch_target_share"] = float(jnp.mean(jnp.argmax(teacher_logits(x_triggered), -1) == target))
    for r in rounds:
        for start in range(starts + 1):
            kw = dict(init_scale=init_scale, init_key=jax.random.key(start)) if start else {}
            delta = synthesize_trigger(teacher_logits, x, rounds=r, lr=lr, l2=l2, temperature=temperature, **kw)
            on_clean = teacher_logits(x_clean + delta)
            out[f"R{r}_" + (f"random{start}" if start else "zero")] = {
                "kl": float(kl_divergence(clean, teacher_logits(x + delta), temperature)),
                "l2_norm": float(jnp.linalg.norm(delta)),
                "batch_plus_delta_hist": histogram(teacher_logits(x + delta), num_classes),
                "clean_plus_delta_hist": histogram(on_clean, num_classes),
                "clean_plus_delta_target_rate": float(100.0 * jnp.mean(jnp.argmax(on_clean, -1) == target)),
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--starts", type=int, default=3, help="random starts besides the zero start")
    ap.add_argument("--init-scale", type=float, default=1e-3)
    ap.add_argument("--sr-pseudo-batches", type=int, default=10)
    ap.add_argument("--reuse-prefix", action="store_true", help="as experiments.sr_sweep's (shares its checkpoint)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    r = resume_point(args.workdir, args.seed, sr_pseudo_batches=args.sr_pseudo_batches, smoke=args.smoke,
                     reuse_prefix=args.reuse_prefix)
    cfg, zc, es, ds = r.cfg, r.zc, r.eval_sets, r.dataset
    trigger = make_trigger(cfg.attack.trigger, ds.image_shape[0], ds.image_shape[2], seed=cfg.attack.trigger_seed,
                           pattern_file=cfg.attack.pattern_file or None)

    def teacher_logits(x):  # not jitted on its own: SR's trigger search traces the teacher inline
        return r.teacher.apply(r.tvars, x, train=False)[0]

    x_clean = normalize(jnp.asarray(es.x_triggered_clean), ds.mean, ds.std)
    # The real trigger's size in the same (normalized) units as delta, per test image.
    trigger_l2 = jnp.linalg.norm((normalize(jnp.asarray(es.x_triggered), ds.mean, ds.std) - x_clean).reshape(len(x_clean), -1), axis=1)
    print(f"real trigger on the test images: |x_triggered - x| {float(trigger_l2.min()):.1f}-{float(trigger_l2.max()):.1f}")
    batches = []
    for i in range(args.batches):
        x = sample_images(r.generator, r.state.generator, jax.random.fold_in(r.state.key, 10**6 + i),
                          zc.batch_size, zc.z_dim)
        batches.append(probe_batch(teacher_logits, x, x_clean, es.target, ds.num_classes, args.rounds,
                                   lr=zc.sr_pert_lr, l2=zc.sr_l2, temperature=zc.temperature,
                                   x_triggered=paste_trigger(x, trigger, ds.mean, ds.std),
                                   init_scale=args.init_scale, starts=args.starts))
        b = batches[-1]
        print(f"batch {i}: teacher classes {b['batch_hist']} (target {es.target}); "
              f"max |grad| at delta = 0: {b['grad_at_zero_max_abs']:.1e}"
              + (f"; real trigger KL {b['real_trigger_kl']:.3f}" if "real_trigger_kl" in b else ""))
        for name, d in b.items():
            if name.startswith("R"):
                print(f"  {name}: KL {d['kl']:.3f}, |delta| {d['l2_norm']:.1f}, clean+delta -> target "
                      f"{d['clean_plus_delta_target_rate']:.1f}%, classes {d['clean_plus_delta_hist']}")
    result = {"seed": args.seed, "target": es.target, "trigger": cfg.attack.trigger,
              "real_trigger_l2": [float(trigger_l2.min()), float(trigger_l2.max())], "pseudo_batch":
              zc.pseudo_batches - zc.sr_pseudo_batches, "device": jax.devices()[0].device_kind, "batches": batches}
    Path(r.workdir, "sr_trigger_probe.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    main()
