"""Contrastive Model Inversion (Fang et al. 2021), spec 6.2, and DeepInversion on the same machinery,
with the ABD hooks (SV in the inversion loss, spec 3.3; SR over the last KD steps, spec 4).

A run is `rounds` rounds ("epochs" in the reference, with ep_steps = kd_steps): each round is one
jitted step of `run_steps` = one synthesis round (abd_jax/kd/synthesis.py: the generator reset,
g_steps of inversion, the best batch into the pool and the memory bank) followed by `kd_steps`
student steps on batches drawn from the pool filled so far (KL at T = 20, batchmean x T^2; SGD
0.1, momentum 0.9, wd 1e-4, cosine over the rounds, stepped once per round as the reference's
per-epoch scheduler). Checkpoints therefore fall between rounds, and the pool, the bank and the
head live in the state, so a resumed run continues exactly.

Self-Retrospection (the released CMI defense runs SR only, spec 5 / 12.7) runs over the last
`sr_steps` KD steps, a whole number of rounds (the reference resumes an epoch checkpoint), with a
fresh SGD at `sr_resume_lr` (momentum and weight decay as before, cosine over the remaining
rounds), `sr_resume_optimizer`. Synthesis carries on during SR, as in the reference.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from abd_jax.abd.options import ABDOptions
from abd_jax.abd.self_retrospection import batchmean_sr_hooks, sr_resume_optimizer
from abd_jax.abd.shuffle_vaccine import init_shuffle_vaccine, make_generator_penalty, suspicion_reports
from abd_jax.augment import normalize, random_crop_flip
from abd_jax.data.base import Dataset
from abd_jax.kd.common import DFKDHooks, Metrics, apply_gradients, forward, sr_stats_state
from abd_jax.kd.loop import run_steps
from abd_jax.kd.synthesis import (
    InversionWeights,
    SynthesisState,
    feature_dim,
    init_synthesis_state,
    make_synthesis_round,
    pool_sample,
)
from abd_jax.kd.zskt_train import ZSKTResult, per_pseudo_batch
from abd_jax.losses import kl_per_example
from abd_jax.models import MODEL_NAMES, check_classifier_fits, get_model, init_model
from abd_jax.models.cmi_generator import CMIGenerator
from abd_jax.models.conv_op import loop_friendly_convs
from abd_jax.optim import cosine_schedule, make_optimizer
from abd_jax.pipeline import EvalSets, evaluator, normalized_test_images
from abd_jax.resume import CheckpointPolicy
from abd_jax.state import TrainState, create_train_state

PyTree = Any


@dataclasses.dataclass(frozen=True)
class CMIConfig(ABDOptions):
    """CMI / DeepInversion hyper-parameters. Defaults: the released CMI CIFAR-10 sweep (spec 6.2)
    except the run length (`rounds`; the reference runs 200) which callers set."""

    rounds: int = 200
    g_steps: int = 200
    synthesis_batch: int = 256
    kd_steps: int = 400
    batch_size: int = 128
    lr_g: float = 1e-3
    lr_student: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bn: float = 1.0
    oh: float = 1.0
    adv: float = 0.5
    cr: float = 0.8
    tv: float = 0.0  # DeepInversion's image prior (ABD passes tv = 1e-3 to DeepInversion)
    l2: float = 0.0  # DeepInversion's ||x|| prior (0 in ABD)
    cr_temperature: float = 0.1
    bank_size: int = 40960
    negatives: int = 4096
    head_dim: int = 256
    z_dim: int = 256
    generator_width: int = 128
    # "fused": each upsample + 3x3 conv of the generator as four 2x2 convs of the small image
    # (models/upsample_conv.py, same values up to rounding); "separate": as before 2026-11-28.
    generator_upsample: str = "fused"
    kd_temperature: float = 20.0
    crop_pad: int = 4
    student: str = "wrn16_1"
    synthesizer: str = "cmi"  # or "deepinversion"
    flip: bool = True  # horizontal flips in synthesis views and KD batches (off for digits)
    eval_every: int = 0  # in rounds; 0: ten evaluations per run
    # "host": one jitted synthesis iteration / KD step driven by a Python loop; "loop": each round in
    # one jit with lax.fori_loop. On XLA:CPU the loop ran ~18x slower per iteration (docs/CMI.md).
    fuse: str = "host"
    # ABD (the shared ABDOptions fields, abd_jax/abd/options.py). The vaccine's penalty is added to
    # the inversion loss at every synthesis iteration, on the global view (not in the released CMI
    # sweep, spec 12.7); verification (sv_verify_after > 0) is not implemented for CMI. SR runs over
    # the last `sr_steps` KD steps (0 = off), a multiple of kd_steps; CMI's SR uses KLDiv at
    # kd_temperature, batchmean x T^2, teacher-made trigger without an L2 penalty, the clean side not
    # detached (spec 4.1, 12.4).
    sr_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()

        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"cmi.{field} = {getattr(self, field)!r}: {why}; set --config.cmi.{field}=...")

        choices = {"student": MODEL_NAMES, "synthesizer": ("cmi", "deepinversion"), "fuse": ("host", "loop"),
                   "sr_trigger_model": ("teacher", "student"), "generator_upsample": ("fused", "separate")}
        for field, known in choices.items():
            if getattr(self, field) not in known:
                raise bad(field, f"must be one of {', '.join(known)}")
        for field in ("rounds", "g_steps", "synthesis_batch", "kd_steps", "batch_size", "bank_size", "negatives",
                      "head_dim", "z_dim", "generator_width", "sv_copies", "sr_rounds", "sr_fp_iterations"):
            if getattr(self, field) < 1:
                raise bad(field, "must be >= 1")
        for field in ("lr_g", "lr_student", "cr_temperature", "kd_temperature"):
            if not getattr(self, field) > 0:
                raise bad(field, "must be > 0")
        for field in ("bn", "oh", "adv", "cr", "tv", "l2", "sv_coef", "sr_coef", "crop_pad", "weight_decay"):
            if getattr(self, field) < 0:
                raise bad(field, "must be >= 0")
        if self.bank_size % self.synthesis_batch:
            raise bad("bank_size", f"must be a multiple of synthesis_batch ({self.synthesis_batch}), as the "
                      "reference's memory bank asserts")
        if not 0 <= self.sr_steps <= self.rounds * self.kd_steps or self.sr_steps % self.kd_steps:
            raise bad("sr_steps", f"must be a multiple of kd_steps ({self.kd_steps}) in [0, rounds * kd_steps]: SR "
                      "resumes whole rounds, as the reference resumes epoch checkpoints")
        if self.sv and self.sv_verify_after:
            raise bad("sv_verify_after", "vaccine verification is not implemented for CMI; use 0 (SV on from "
                      "the start; the released CMI sweep does not run SV at all)")
        if self.synthesizer == "deepinversion" and self.cr:
            raise bad("cr", "DeepInversion has no contrastive term; set it to 0")

    @classmethod
    def deepinversion(cls, **overrides: Any) -> CMIConfig:
        """DeepInversion's defaults on this machinery: upstream DataFree's CIFAR-10 script (g_steps
        1000, lr_g 0.1, bn 10, oh 1, adv 1 = adaptive DeepInversion, batch 256) with the image prior
        tv = 1e-3 that ABD's `datafree_kd.py` passes, l2 = 0, no contrastive term."""
        base = dict(synthesizer="deepinversion", g_steps=1000, lr_g=0.1, bn=10.0, oh=1.0, adv=1.0, cr=0.0, tv=1e-3,
                    l2=0.0, synthesis_batch=256, batch_size=256)
        return cls(**{**base, **overrides})

    @property
    def sr_rounds_count(self) -> int:
        return self.sr_steps // self.kd_steps

    @property
    def weights(self) -> InversionWeights:
        return InversionWeights(bn=self.bn, oh=self.oh, adv=self.adv, cr=self.cr, tv=self.tv, l2=self.l2)


class CMIState(struct.PyTreeNode):
    """Everything a CMI / DeepInversion run carries from one round to the next."""

    student: TrainState
    synth: SynthesisState
    round: jax.Array  # int32 [], rounds done
    key: jax.Array
    hook_state: Any = None  # the Shuffling Vaccine's state with SV; None otherwise


def kd_batch_loss(t_logits: jax.Array, s_logits: jax.Array, temperature: float) -> jax.Array:
    """CMI's KD loss (spec 6.2): KL_T(T || S), summed over classes, mean over the batch, x T^2."""
    return jnp.mean(kl_per_example(t_logits, s_logits, temperature)) * temperature**2


def make_kd_steps(teacher, student, student_tx: optax.GradientTransformation, *, kd_steps: int, batch_size: int,
                  temperature: float, mean, std, crop_pad: int, flip: bool, hooks: DFKDHooks = DFKDHooks(),
                  fuse: str = "host"):
    """Returns `kd(student_state, synth, teacher_vars, key) -> (student_state, metrics)`: `kd_steps`
    student steps, each on a batch drawn from the pool's filled slots with random crop + flip +
    normalize; with `hooks.student_sr` the SR gradient is handed to the optimizer
    (`self_retrospection` transform) on every step. `fuse` as in `make_synthesis_round`: "loop" (one
    `lax.fori_loop`; jit the result) or "host" (one jitted step, a Python loop; do not jit it)."""
    if fuse not in ("loop", "host"):
        raise ValueError(f"fuse must be 'loop' or 'host', got {fuse!r}")

    def one(s_state: TrainState, synth: SynthesisState, tv: PyTree, key: jax.Array, i: jax.Array):
        k_draw, k_aug, k_sr = jax.random.split(jax.random.fold_in(key, i), 3)
        x = pool_sample(k_draw, synth.pool, synth.pool_count, batch_size)
        x = normalize(random_crop_flip(k_aug, x, pad=crop_pad, flip=flip), mean, std)
        t_logits, _ = teacher.apply(tv, x, train=False)
        prepared = (hooks.student_sr_prepare(tv, x, k_sr, s_state.variables)
                    if hooks.student_sr_prepare is not None else None)
        kd_state = sr_stats_state(hooks, s_state, x, k_sr, prepared)  # SR's forwards come first, as in the reference

        def loss_fn(params):
            (s_logits, _), stats = forward(student, kd_state.replace(params=params), x, train=True)
            return kd_batch_loss(t_logits, s_logits, temperature), stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(s_state.params)
        extra = {}
        if hooks.student_sr is not None:  # Self-Retrospection, spec 4.1
            extra["sr_grads"] = hooks.student_sr(s_state.variables, tv, x, k_sr, prepared)
        return apply_gradients(s_state, student_tx, grads, stats, **extra), loss

    if fuse == "loop":
        def kd(s_state: TrainState, synth: SynthesisState, teacher_vars: PyTree, key: jax.Array):
            def body(i, carry):
                return one(carry[0], synth, teacher_vars, key, i)

            with loop_friendly_convs():  # conv gradients inside fori_loop (abd_jax/models/conv_op.py)
                s_state, loss = jax.lax.fori_loop(0, kd_steps, body, (s_state, jnp.zeros((), jnp.float32)))
            return s_state, {"loss_kd": loss}

        return kd

    j_one = jax.jit(one, donate_argnums=(0,))

    def kd_host(s_state: TrainState, synth: SynthesisState, teacher_vars: PyTree, key: jax.Array):
        loss = jnp.zeros((), jnp.float32)
        for i in range(kd_steps):
            s_state, loss = j_one(s_state, synth, teacher_vars, key, jnp.asarray(i, jnp.int32))
        return s_state, {"loss_kd": loss}

    return kd_host


def make_round(synthesis_round, kd) -> Any:
    """`round(state, teacher_vars) -> (state, metrics)`: synthesis then KD; not jitted."""

    def round_step(state: CMIState, teacher_vars: PyTree) -> tuple[CMIState, Metrics]:
        key = jax.random.fold_in(state.key, state.round)
        k_syn, k_kd = jax.random.split(key)
        synth, m_syn = synthesis_round(state.synth, teacher_vars, state.student.variables, k_syn, state.hook_state)
        student_state, m_kd = kd(state.student, synth, teacher_vars, k_kd)
        return state.replace(student=student_state, synth=synth, round=state.round + 1), {**m_syn, **m_kd}

    return round_step


def sr_hooks(teacher, student, cfg: CMIConfig) -> DFKDHooks:
    """CMI's SR (the reference's `UnlearnOptimizer`, spec 4.1) at T = kd_temperature
    (`batchmean_sr_hooks`). A new batch every KD step, so the trigger is synthesized every step."""
    student_sr, prepare, sr_stats = batchmean_sr_hooks(teacher, student, cfg, cfg.kd_temperature)
    return DFKDHooks(student_sr=student_sr, student_sr_prepare=prepare, student_sr_stats=sr_stats)


def _student_tx(cfg: CMIConfig) -> optax.GradientTransformation:
    # Cosine over the rounds, stepped once per round (the reference steps it once per epoch).
    lr = per_pseudo_batch(cosine_schedule(cfg.lr_student, cfg.rounds), cfg.kd_steps)
    return make_optimizer("sgd", lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_cmi(teacher, dataset: Dataset, cfg: CMIConfig, seed: int, teacher_vars: PyTree,
              hooks: DFKDHooks = DFKDHooks()):
    """Returns (student module, initial CMIState, round step fn, synthesis round fn) for the main
    (pre-SR) phase. With `cfg.fuse == "loop"` the round is pure (jit it); with "host" it compiles
    its own pieces.

    With `cfg.sv` the vaccine penalty is added to `hooks` and its state goes into `hook_state`.
    """
    check_classifier_fits(teacher, teacher_vars, dataset.image_shape, dataset.num_classes)
    size, _, channels = dataset.image_shape
    student = get_model(cfg.student, num_classes=dataset.num_classes)
    generator = CMIGenerator(z_dim=cfg.z_dim, image_size=size, channels=channels, width=cfg.generator_width,
                             fused_upsample=cfg.generator_upsample == "fused")
    k_s, k_h, k_run, k_sv = jax.random.split(jax.random.key(seed), 4)
    s_tx = _student_tx(cfg)
    hook_state = None
    if cfg.sv:
        hook_state = init_shuffle_vaccine(k_sv, teacher_vars, coef=cfg.sv_coef, n_copies=cfg.sv_copies,
                                          n_layers=cfg.sv_layers, share_prefix=cfg.sv_share_prefix)
        # Computed and multiplied by coef rather than skipped under lax.cond (ZSKT measured the
        # cond slower on XLA:CPU, docs/ABD_SV.md); with coef 0 the loss is unchanged.
        hooks = hooks._replace(generator_penalty=make_generator_penalty(teacher, skip_when_off=False))
    d = feature_dim(teacher, teacher_vars, dataset.image_shape)
    synth = init_synthesis_state(k_h, capacity=cfg.rounds * cfg.synthesis_batch, image_shape=dataset.image_shape,
                                 feature_dim=d, bank_size=cfg.bank_size, head_dim=cfg.head_dim,
                                 head_tx=optax.adam(cfg.lr_g))
    state = CMIState(student=create_train_state(init_model(student, k_s, dataset.image_shape), s_tx,
                                                jax.random.fold_in(k_run, 1)),
                     synth=synth, round=jnp.zeros((), jnp.int32), key=k_run, hook_state=hook_state)
    synthesis_round = make_synthesis_round(
        teacher, student, synthesizer=cfg.synthesizer, num_classes=dataset.num_classes,
        image_shape=dataset.image_shape, mean=dataset.mean, std=dataset.std, g_steps=cfg.g_steps,
        batch_size=cfg.synthesis_batch, lr_g=cfg.lr_g, weights=cfg.weights,
        generator=generator if cfg.synthesizer == "cmi" else None, z_dim=cfg.z_dim,
        cr_temperature=cfg.cr_temperature, negatives=cfg.negatives, head_dim=cfg.head_dim, crop_pad=cfg.crop_pad,
        flip=cfg.flip, hooks=hooks, fuse=cfg.fuse)
    kd = _kd(teacher, student, s_tx, dataset, cfg, hooks)
    return student, state, make_round(synthesis_round, kd), synthesis_round


def _kd(teacher, student, tx, dataset: Dataset, cfg: CMIConfig, hooks: DFKDHooks):
    return make_kd_steps(teacher, student, tx, kd_steps=cfg.kd_steps, batch_size=cfg.batch_size,
                         temperature=cfg.kd_temperature, mean=dataset.mean, std=dataset.std, crop_pad=cfg.crop_pad,
                         flip=cfg.flip, hooks=hooks, fuse=cfg.fuse)


def sr_phase(teacher, student, dataset: Dataset, state: CMIState, cfg: CMIConfig, synthesis_round):
    """The SR resume (spec 4.2, CMI row): a fresh `self_retrospection` + SGD(sr_resume_lr, momentum,
    weight decay) cosine over the remaining rounds; pool, bank, head and vaccine carry on.
    Returns (state, round step fn)."""
    tx = sr_resume_optimizer(cfg.sr_resume_lr, cfg.sr_rounds_count, updates_per_step=cfg.kd_steps,
                             coef=cfg.sr_coef, optimizer="sgd", momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay)
    student_state = state.student.replace(opt_state=tx.init(state.student.params))
    kd = _kd(teacher, student, tx, dataset, cfg, sr_hooks(teacher, student, cfg))
    return state.replace(student=student_state), make_round(synthesis_round, kd)


def pool_images(state: CMIState, n: int = 64) -> np.ndarray:
    """The last n images written to the pool (uint8 [n, H, W, C]; fewer if the pool holds fewer)."""
    count = int(state.synth.pool_count)
    return np.asarray(state.synth.pool[max(count - n, 0):count])


def sv_report(teacher, teacher_vars: PyTree, state: CMIState, dataset: Dataset, eval_sets: EvalSets,
              n_synthetic: int = 256) -> dict[str, dict[str, np.ndarray]]:
    """What the vaccine flags at the end of an SV run (`suspicion_reports`): the last `n_synthetic`
    pool images (the data SV acted on) and, for diagnosis only, the clean and triggered test images
    (which a defender would not have; spec 3.4)."""
    synthetic = normalize(jnp.asarray(pool_images(state, n_synthetic)), dataset.mean, dataset.std)
    return suspicion_reports(teacher, teacher_vars, state.hook_state, {
        "synthetic": np.asarray(synthetic),
        **normalized_test_images(eval_sets, dataset.mean, dataset.std),
    })


def distill_cmi(
    teacher,
    teacher_vars: PyTree,
    dataset: Dataset,
    eval_sets: EvalSets,
    cfg: CMIConfig,
    *,
    seed: int = 0,
    desc: str = "cmi",
    checkpoint: CheckpointPolicy | None = None,
    mesh: Mesh | None = None,
) -> ZSKTResult:
    """Runs `cfg.rounds` CMI (or DeepInversion) rounds, the last `cfg.sr_steps // cfg.kd_steps` of
    them with Self-Retrospection, evaluating the student every `eval_every` rounds.

    Returns a `ZSKTResult`: `state` is the final `CMIState` (`state.student` the student's
    TrainState), `samples` 64 uint8 pool images, `suspicion` the SV report with `cfg.sv`.
    `checkpoint`: per-phase checkpoints / resume (abd_jax.resume); `mesh`: run_steps' device mesh.
    """
    student, state, step, synthesis_round = build_cmi(teacher, dataset, cfg, seed, teacher_vars)
    ev = evaluator(student, dataset.mean, dataset.std, eval_sets)
    eval_every = cfg.eval_every or max(cfg.rounds // 10, 1)
    # With fuse="host" the round compiles its own pieces (run_steps must not jit it).
    kwargs = dict(evaluate=lambda s: ev(s.student.variables), eval_every=eval_every, checkpoint=checkpoint,
                  mesh=mesh, jit_step=cfg.fuse == "loop")
    main_rounds = cfg.rounds - cfg.sr_rounds_count
    t0 = time.perf_counter()
    state, history = run_steps(step, state, teacher_vars, num_steps=main_rounds, desc=desc, **kwargs)
    if cfg.sr_rounds_count:
        state, sr_step = sr_phase(teacher, student, dataset, state, cfg, synthesis_round)
        state, more = run_steps(sr_step, state, teacher_vars, num_steps=cfg.rounds, start_step=main_rounds,
                                desc=f"{desc} (SR)", **kwargs)
        history = history + [{**h, "sr": 1.0} for h in more]
    seconds = (time.perf_counter() - t0) / cfg.rounds
    report = sv_report(teacher, teacher_vars, state, dataset, eval_sets) if cfg.sv else None
    return ZSKTResult(student, state, history, seconds, pool_images(state), report)
