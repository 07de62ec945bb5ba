"""OOD-KD (spec 6.3): distill on patches of a single natural image, with ABD through DFKDHooks.

Per step (`make_ood_step`): draw a batch of patches of the source photo (abd_jax/data/ood.py),
optionally re-style them, apply the train transform (random crop with zero padding 4, flip), CutMix
the batch, normalize with the task's mean/std, label it with the frozen teacher once, and update the
student on KL_tau(T || S) (reduction 'mean' over B*C, no tau^2; spec 6.3, 12.4) with Adam and the
MultiStep schedule.

ABD (spec 3.3, 4): the Shuffling Vaccine cannot change OOD data, so it re-weights the per-sample
KD loss (`DFKDHooks.sample_weights`, `shuffle_vaccine.make_sample_weights`): flagged samples get a
negative weight, i.e. the student is pushed away from the teacher on them. Self-Retrospection runs
over the last `sr_steps` steps with a fresh `sr_resume_optimizer`, as the reference's resumed job
(spec 4.2), its hypergradient added by the `self_retrospection` transform. Vaccine verification
(spec 3.4) runs when `sv_verify_after` > 0.

Departures from the reference (docs/OOD_KD.md lists them with reasons): patches are drawn fresh
every step instead of from a fixed 50,000-image folder; the run length is counted in steps (the
MultiStep milestones are fractions of it); the SR resume's cosine is stepped per step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from abd_jax.abd.options import ABDOptions
from abd_jax.abd.self_retrospection import batchmean_sr_hooks, sr_resume_optimizer
from abd_jax.abd.shuffle_vaccine import (
    PUSH_CAPS,
    cap_pushed_losses,
    init_shuffle_vaccine,
    make_divergence_fn,
    make_sample_weights,
    suspicion_reports,
    verify_vaccine,
)
from abd_jax.augment import normalize, random_crop_flip
from abd_jax.data.base import Dataset
from abd_jax.data.ood import PATCH_COLORS, cutmix, load_source_image, patch_style, prepare_source, sample_patches
from abd_jax.kd.common import DFKDHooks, Metrics, apply_gradients, forward, sr_stats_state, with_hook_state
from abd_jax.kd.loop import run_steps
from abd_jax.kd.zskt_train import ZSKTResult, samples_to_pixels
from abd_jax.losses import kl_elementwise
from abd_jax.models import MODEL_NAMES, check_classifier_fits, get_model, init_model
from abd_jax.parallel import constrain_batch
from abd_jax.pipeline import EvalSets, evaluator, normalized_test_images
from abd_jax.resume import CheckpointPolicy
from abd_jax.state import TrainState, create_train_state

PyTree = Any

# Spec 6.3: 300 epochs of 50,000 patches at batch 512 with drop_last = 97 steps per epoch.
SPEC_STEPS = 300 * (50_000 // 512)


@dataclasses.dataclass(frozen=True)
class OODConfig(ABDOptions):
    """OOD-KD hyper-parameters; defaults are spec 6.3 (CIFAR-10 recipe) unless marked."""

    steps: int = SPEC_STEPS
    student: str = "wrn16_1"
    batch_size: int = 512
    lr: float = 1e-3  # Adam
    # MultiStepLR([150, 300, 600], gamma 0.5) over 300 epochs, as fractions of the run; the
    # milestones at or past the end never act (as in the reference, where only epoch 150 does).
    lr_milestones: tuple[float, ...] = (0.5, 1.0, 2.0)
    lr_gamma: float = 0.5
    temperature: float = 8.0  # KL, reduction 'mean', no T^2
    cutmix_beta: float = 0.25  # CutMix on every batch (prob 1)
    # The patch source (abd_jax/data/ood.py). Upstream tool defaults: initial crop 0.5, rotation
    # and shear +-30 degrees, flips; its scale range is not in the spec (ours: RandomResizedCrop-
    # like area fraction).
    source: str = "china.jpg"
    init_crop: float = 0.5
    scale_min: float = 0.25
    scale_max: float = 1.0
    degrees: float = 30.0
    shear: float = 30.0
    patch_flip: bool = True
    source_resolution: float = 2.0  # source pixels per patch pixel for an initial crop (antialias)
    # Not in the reference (probes for digits, docs/OOD_KD.md): patch re-styling.
    patch_color: str = "rgb"  # "rgb" | "grey" | "edges"
    patch_invert: bool = False
    patch_stretch: bool = False
    # Sample patches at size / patch_block and repeat each pixel patch_block x patch_block times
    # (the embedded digits are 8x8 glyphs upsampled by pixel replication, docs/DATA.md).
    patch_block: int = 1
    # Train transform (spec: flip + RandomCrop(pad 4)); the digits configs turn flips off.
    flip: bool = True
    crop_pad: int = 4
    eval_every: int = 0  # 0: ten evaluations per run
    # ABD (the shared ABDOptions fields, abd_jax/abd/options.py). The vaccine re-weights the KD loss
    # (spec 3.3); with sv_verify_after = P > 11, P warm-up steps with SV off, batches 11..P-1 pooled,
    # then the tail-ratio test (spec 3.4). SR runs over the last `sr_steps` steps, resumed with a
    # fresh Adam at `sr_resume_lr` (cosine over those steps). The OOD code base scales the SR KL as
    # batchmean * T^2 at T = `temperature` (spec 12.4) and synthesizes the trigger without an L2 term
    # (spec 4.1.1); `sr_l2` is the inner problem's penalty; the trigger model is the teacher in the
    # reference (spec 12.1).
    sr_steps: int = 0
    # Not in the reference: "uniform" stops pushing a flagged sample once its KD loss reaches a
    # uniform prediction's (`cap_pushed_losses`); "none" is the reference's unbounded push.
    sv_push_cap: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {"student": MODEL_NAMES, "patch_color": PATCH_COLORS, "sr_trigger_model": ("teacher", "student"),
                   "sv_push_cap": PUSH_CAPS}
        for field, known in choices.items():
            value = getattr(self, field)
            if value not in known:
                raise ValueError(f"unknown OOD {field} {value!r}; set --config.ood.{field}=... to one of: "
                                 f"{', '.join(known)}")

        def bad(field: str, why: str) -> None:
            raise ValueError(f"OOD {field}={getattr(self, field)!r}: {why}; fix --config.ood.{field}")

        for field in ("steps", "batch_size"):
            if getattr(self, field) < 1:
                bad(field, "must be >= 1")
        for field in ("lr", "temperature", "cutmix_beta", "init_crop", "source_resolution"):
            if not getattr(self, field) > 0:
                bad(field, "must be > 0")
        if not 0 < self.scale_min <= self.scale_max:
            bad("scale_min", f"must satisfy 0 < scale_min <= scale_max ({self.scale_max})")
        if not 0 <= self.sr_steps <= self.steps:
            bad("sr_steps", f"must be in [0, steps={self.steps}]")
        if self.sv and self.sv_verify_after and not 11 < self.sv_verify_after <= self.steps - self.sr_steps:
            bad("sv_verify_after", f"must be 0 (off) or in [12, {self.steps - self.sr_steps}] (batches 11.. are "
                                   "pooled, spec 3.4)")
        if self.patch_block < 1:
            bad("patch_block", "must be >= 1")
        if self.crop_pad < 0:
            bad("crop_pad", "must be >= 0")


class OODState(struct.PyTreeNode):
    """Everything an OOD-KD run carries from step to step (`student` is the student TrainState)."""

    student: TrainState
    step: jax.Array
    key: jax.Array
    hook_state: Any = None  # the Shuffling Vaccine's state, None without SV


def multistep_schedule(cfg: OODConfig) -> optax.Schedule:
    """MultiStepLR with milestones at fractions of the run (spec 6.3)."""
    bounds = {int(round(f * cfg.steps)): cfg.lr_gamma for f in cfg.lr_milestones if 0 < round(f * cfg.steps) < cfg.steps}
    return optax.piecewise_constant_schedule(cfg.lr, bounds) if bounds else optax.constant_schedule(cfg.lr)


def make_ood_batch(
    source: jax.Array, *, mean, std, batch_size: int, size: int, cfg: OODConfig
) -> Callable[[jax.Array], jax.Array]:
    """`batch(key) -> x [B, size, size, 3]` normalized, as the student sees it (not jitted):
    patches -> style -> crop/flip (pixel space, zero padding) -> CutMix -> normalize."""

    def batch(key: jax.Array) -> jax.Array:
        k_p, k_a, k_m = jax.random.split(key, 3)
        small = -(-size // cfg.patch_block)
        x = sample_patches(k_p, source, batch_size, small, init_crop=cfg.init_crop,
                           scale=(cfg.scale_min, cfg.scale_max), degrees=cfg.degrees, shear=cfg.shear,
                           flip=cfg.patch_flip)
        if cfg.patch_block > 1:
            x = jnp.repeat(jnp.repeat(x, cfg.patch_block, axis=1), cfg.patch_block, axis=2)[:, :size, :size]
        x = patch_style(x, color=cfg.patch_color, invert=cfg.patch_invert, stretch=cfg.patch_stretch) * 255.0
        if cfg.crop_pad or cfg.flip:
            x = random_crop_flip(k_a, x, pad=cfg.crop_pad, flip=cfg.flip)
        x = cutmix(k_m, x, cfg.cutmix_beta)
        return constrain_batch(normalize(x, mean, std))

    return batch


def make_ood_step(
    teacher,
    student,
    tx: optax.GradientTransformation,
    *,
    source: jax.Array,
    mean,
    std,
    size: int,
    cfg: OODConfig,
    hooks: DFKDHooks = DFKDHooks(),
) -> Callable[[OODState, PyTree], tuple[OODState, Metrics]]:
    """Returns `step(state, teacher_vars) -> (state, metrics)`; not jitted (run_steps jits).

    One teacher forward per step. `hooks.sample_weights` (SV) re-weights the per-sample KL;
    `hooks.student_sr` (SR) adds its gradient through `tx`'s `self_retrospection` transform, with
    `hooks.student_sr_prepare` (the teacher's trigger) computed once per batch.
    """
    batch = make_ood_batch(source, mean=mean, std=std, batch_size=cfg.batch_size, size=size, cfg=cfg)

    def step(state: OODState, teacher_vars: PyTree) -> tuple[OODState, Metrics]:
        key = jax.random.fold_in(state.key, state.step)
        k_x, k_sr = jax.random.split(key)
        x = batch(k_x)
        t_logits = jax.lax.stop_gradient(teacher.apply(teacher_vars, x, train=False)[0])
        hs = with_hook_state(state.hook_state)
        weights = hooks.sample_weights(t_logits, x, *hs) if hooks.sample_weights is not None else None
        prepared = (hooks.student_sr_prepare(teacher_vars, x, k_sr, state.student.variables)
                    if hooks.student_sr_prepare else None)
        kd_state = sr_stats_state(hooks, state.student, x, k_sr, prepared)  # SR's forwards come first, as in the reference

        def loss_fn(params):
            (s_logits, _), stats = forward(student, kd_state.replace(params=params), x, train=True)
            per_sample = jnp.mean(kl_elementwise(t_logits, s_logits, cfg.temperature), axis=-1)  # [B]
            # weights None: the plain mean, the reference's reduction='mean' over B*C.
            if weights is None:
                loss = jnp.mean(per_sample)
            else:
                capped = cap_pushed_losses(per_sample, weights, t_logits, cfg.temperature, cfg.sv_push_cap)
                loss = jnp.mean(weights * capped)
            return loss, (stats, jnp.mean(per_sample))

        (loss, (stats, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student.params)
        extra, metrics = {}, {"loss_s": loss, "kl": kl}
        if weights is not None:
            metrics["sv_flagged"] = jnp.sum(weights < 0).astype(jnp.float32)
        if hooks.student_sr is not None:  # Self-Retrospection, spec 4.1
            extra["sr_grads"] = hooks.student_sr(state.student.variables, teacher_vars, x, k_sr, prepared)
        s_state = apply_gradients(state.student, tx, grads, stats, **extra)
        return state.replace(student=s_state, step=state.step + 1), metrics

    return step


def sr_hooks(teacher, student, cfg: OODConfig) -> tuple[Callable, Callable | None, Callable | None]:
    """(student_sr, student_sr_prepare, student_sr_stats) for OOD-KD: SR as the CMI/OOD code base
    runs it, at T = cfg.temperature (`batchmean_sr_hooks`)."""
    return batchmean_sr_hooks(teacher, student, cfg, cfg.temperature)


def _source(cfg: OODConfig, size: int) -> jax.Array:
    image = load_source_image(cfg.source)
    return jnp.asarray(prepare_source(image, -(-size // cfg.patch_block), init_crop=cfg.init_crop, resolution=cfg.source_resolution))


def build_ood(teacher, teacher_vars: PyTree, dataset: Dataset, cfg: OODConfig, seed: int,
              hooks: DFKDHooks = DFKDHooks()):
    """Returns (student module, initial OODState, step fn, source image [h, w, 3] in [0, 1])."""
    size = dataset.image_shape[0]
    check_classifier_fits(teacher, teacher_vars, dataset.image_shape, dataset.num_classes)
    student = get_model(cfg.student, num_classes=dataset.num_classes)
    k_s, k_run = jax.random.split(jax.random.key(seed))
    s_vars = init_model(student, k_s, dataset.image_shape)
    sv_state = None
    if cfg.sv:
        sv_state = init_shuffle_vaccine(jax.random.fold_in(k_run, 3), teacher_vars, coef=cfg.sv_coef,
                                        n_copies=cfg.sv_copies, n_layers=cfg.sv_layers,
                                        verify=cfg.sv_verify_after > 0, share_prefix=cfg.sv_share_prefix)
        hooks = hooks._replace(sample_weights=make_sample_weights(teacher))
    tx = optax.adam(multistep_schedule(cfg))
    state = OODState(student=create_train_state(s_vars, tx, jax.random.fold_in(k_run, 1)),
                     step=jnp.zeros((), jnp.int32), key=k_run, hook_state=sv_state)
    source = _source(cfg, size)
    step = make_ood_step(teacher, student, tx, source=source, mean=dataset.mean, std=dataset.std, size=size,
                         cfg=cfg, hooks=hooks)
    return student, state, step, source


def sr_phase(teacher, student, state: OODState, source: jax.Array, dataset: Dataset, cfg: OODConfig,
             hooks: DFKDHooks, with_sr: bool = True):
    """The SR resume (spec 4.2): a fresh `sr_resume_optimizer` for the student (Adam, cosine from
    `sr_resume_lr` over the last `sr_steps`, SR weight `sr_coef`); the vaccine carries on.
    `with_sr=False` builds the same resume without the SR hook (the plain resumed run)."""
    tx = sr_resume_optimizer(cfg.sr_resume_lr, cfg.sr_steps, coef=cfg.sr_coef)
    student_state = state.student.replace(opt_state=tx.init(state.student.params))
    if with_sr:
        student_sr, prepare, sr_stats = sr_hooks(teacher, student, cfg)
        hooks = hooks._replace(student_sr=student_sr, student_sr_prepare=prepare, student_sr_stats=sr_stats)
    step = make_ood_step(teacher, student, tx, source=source, mean=dataset.mean, std=dataset.std,
                         size=dataset.image_shape[0], cfg=cfg, hooks=hooks)
    return state.replace(student=student_state), step


def _verify(step, state: OODState, teacher, teacher_vars: PyTree, source: jax.Array, dataset: Dataset,
            cfg: OODConfig, seed: int, run_kwargs: dict):
    """Spec 3.4 in OOD-KD: `sv_verify_after` = P steps with SV off (coef 0), pooling the batches of
    steps 11..P-1 (the reference pools KD batches with 10 < c < P) with their teacher logits, then
    `verify_vaccine`. The pooled batch of step i is recomputed from the state's key (the step draws
    all its randomness from fold_in(key, i)), so it is exactly the batch trained on."""
    first = 11
    batch = make_ood_batch(source, mean=dataset.mean, std=dataset.std, batch_size=cfg.batch_size,
                           size=dataset.image_shape[0], cfg=cfg)

    @jax.jit
    def pooled(key, i, tv):
        x = batch(jax.random.split(jax.random.fold_in(key, i))[0])
        return x, teacher.apply(tv, x, train=False)[0]

    n = cfg.sv_verify_after - first
    x0, t0 = jax.eval_shape(pooled, state.key, 0, teacher_vars)
    pool = {"x": np.zeros((n, *x0.shape), np.float32), "t": np.zeros((n, *t0.shape), np.float32)}
    key = state.key

    def collect(i: int, s: OODState) -> None:
        if i >= first:
            x, t = pooled(key, i, teacher_vars)
            pool["x"][i - first], pool["t"][i - first] = np.asarray(x), np.asarray(t)

    state, history = run_steps(step, state, teacher_vars, num_steps=cfg.sv_verify_after, on_step=collect,
                               host_state=pool, **run_kwargs)
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    sv, log = verify_vaccine(jax.random.key(seed + 3), jax.jit(make_divergence_fn(teacher)), flat(pool["x"]),
                             flat(pool["t"]), state.hook_state, n_layers=cfg.sv_layers,
                             threshold=cfg.sv_verify_threshold)
    return state.replace(hook_state=sv), history, log


def distill_ood(
    teacher,
    teacher_vars: PyTree,
    dataset: Dataset,
    eval_sets: EvalSets,
    cfg: OODConfig,
    *,
    seed: int = 0,
    desc: str = "ood",
    checkpoint: CheckpointPolicy | None = None,
    mesh: Mesh | None = None,
    hooks: DFKDHooks = DFKDHooks(),
    sr_hook: bool = True,
) -> ZSKTResult:
    """Runs `cfg.steps` OOD-KD steps with periodic Acc / ASR / clean-target-rate evaluation.

    With `cfg.sv` the vaccine re-weights the KD loss throughout (after its verification warm-up
    when `sv_verify_after` > 0); with `cfg.sr_steps` the last steps resume with Self-Retrospection
    (`sr_hook=False` runs the same resume without SR: the matching plain run). Every phase runs
    through `run_steps`, so `checkpoint` makes it resumable.

    Returns a `ZSKTResult`: `state` is the OODState (`state.student` the student TrainState),
    `samples` up to 64 training images as the student saw them (uint8), `suspicion` the SV
    report on patches and the clean / triggered test images (with SV), `sv_verification` the
    per-trial tail statistics (with verification).
    """
    student, state, step, source = build_ood(teacher, teacher_vars, dataset, cfg, seed, hooks)
    ev = evaluator(student, dataset.mean, dataset.std, eval_sets)
    evaluate = lambda s: ev(s.student.variables)  # noqa: E731
    eval_every = cfg.eval_every or max(cfg.steps // 10, 1)
    kw = dict(evaluate=evaluate, eval_every=eval_every, desc=desc, checkpoint=checkpoint, mesh=mesh)
    t0 = time.perf_counter()
    history, log, start = [], None, 0
    if cfg.sv and cfg.sv_verify_after > 0:
        state, history, log = _verify(step, state, teacher, teacher_vars, source, dataset, cfg, seed, kw)
        start = cfg.sv_verify_after
    main = cfg.steps - cfg.sr_steps
    state, more = run_steps(step, state, teacher_vars, num_steps=main, start_step=start, **kw)
    history += more
    if cfg.sr_steps:
        sv_hooks = hooks._replace(sample_weights=make_sample_weights(teacher)) if cfg.sv else hooks
        state, sr_step = sr_phase(teacher, student, state, source, dataset, cfg, sv_hooks, with_sr=sr_hook)
        state, more = run_steps(sr_step, state, teacher_vars, num_steps=cfg.steps, start_step=main,
                                **{**kw, "desc": f"{desc} (SR)" if sr_hook else f"{desc} (resume)",
                                   "eval_every": max(min(eval_every, cfg.sr_steps // 2), 1)})
        history += [{**h, "sr": 1.0} for h in more]
    seconds = (time.perf_counter() - t0) / cfg.steps
    batch = jax.jit(make_ood_batch(source, mean=dataset.mean, std=dataset.std, batch_size=cfg.batch_size,
                                   size=dataset.image_shape[0], cfg=cfg))
    x = batch(jax.random.key(seed + 1))[:64]
    report = None
    if cfg.sv:
        report = suspicion_reports(teacher, teacher_vars, state.hook_state, {
            "patches": np.asarray(x),
            **normalized_test_images(eval_sets, dataset.mean, dataset.std),
        })
    return ZSKTResult(student, state, history, seconds, samples_to_pixels(x, dataset.mean, dataset.std), report, log)
