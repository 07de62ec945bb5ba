"""A whole ZSKT distillation: build student, generator and optimizers from a typed config, run the
jitted pseudo-batches with periodic Acc/ASR evaluation, return the history.

`ZSKTConfig` defaults are the spec's CIFAR-10 recipe (6.1) except the run length, which callers set.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from abd_jax.abd.options import ABDOptions
from abd_jax.abd.self_retrospection import (
    refine_on_student,
    retrospect,
    sr_grads,
    sr_resume_optimizer,
    sr_stats_hook,
    trigger_start_key,
    synthesize_trigger,
    train_mode_apply,
)
from abd_jax.abd.shuffle_vaccine import (
    init_shuffle_vaccine,
    make_divergence_fn,
    make_generator_penalty,
    make_teacher_and_penalty,
    suspicion_reports,
    verify_vaccine,
)
from abd_jax.augment import denormalize
from abd_jax.data.base import Dataset
from abd_jax.kd.common import DFKDHooks
from abd_jax.kd.generator_losses import METHODS, method_losses
from abd_jax.kd.loop import run_steps
from abd_jax.kd.zskt import ZSKTState, make_pseudo_batch, sample_images
from abd_jax.models import (
    MODEL_NAMES,
    Generator,
    check_classifier_fits,
    get_model,
    init_model,
)
from abd_jax.models.generator import _OUT_ACTIVATIONS
from abd_jax.optim import cosine_schedule, make_optimizer
from abd_jax.pipeline import EvalSets, evaluator, normalized_test_images
from abd_jax.resume import CheckpointPolicy
from abd_jax.state import create_train_state

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ZSKTConfig(ABDOptions):
    """ZSKT hyper-parameters (spec 6.1 defaults)."""

    pseudo_batches: int = 80_000
    # Which method's losses the pseudo-batch uses (abd_jax/kd/generator_losses.py): "zskt" (spec
    # 6.1), "dfad" (L1 adversarial) or "dafl" (non-adversarial generator). The fields below keep
    # ZSKT's defaults; `generator_losses.method_defaults(method)` gives each method's own.
    method: str = "zskt"
    dafl_oh: float = 1.0  # DAFL generator loss weights (DAFL's official defaults)
    dafl_act: float = 0.1
    dafl_balance: float = 5.0
    student: str = "wrn16_1"
    batch_size: int = 128
    z_dim: int = 100
    n_student_steps: int = 10
    lr_student: float = 2e-3
    lr_generator: float = 1e-3
    beta: float = 250.0
    temperature: float = 1.0
    clip_norm: float = 5.0  # 0: no clipping
    # The student's optimizer: Adam (spec 6.1) or SGD with momentum and coupled weight decay (the
    # DFAD / DAFL references); the generator's is always Adam.
    student_optimizer: str = "adam"
    student_momentum: float = 0.9  # SGD only
    student_weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" over the run (spec) or "constant"
    generator_width: int = 128
    generator_out: str = "none"
    # "fused": each upsample + 3x3 conv of the generator as four 2x2 convs of the small image
    # (models/upsample_conv.py, same values up to rounding, ~2.5x less work); "separate": upsample
    # then convolve, as before 2026-11-27 (bitwise reproduction of earlier runs).
    generator_upsample: str = "fused"
    # With SV (and sv_share_prefix), ZSKT's generator step runs the teacher's forward and the
    # shuffled copies from one unshuffled prefix (`DFKDHooks.teacher_and_penalty`); False runs the
    # teacher's forward separately, as before 2026-11-28 (bitwise reproduction of earlier runs).
    sv_share_teacher: bool = True
    fuse: str = "unroll"
    scan_unroll: int = 1
    eval_every: int = 0  # 0: ten evaluations per run
    # ABD (the shared ABDOptions fields, abd_jax/abd/options.py): the vaccine's penalty enters the
    # generator step; SR runs over the last `sr_pseudo_batches`, resumed with a fresh Adam at
    # `sr_resume_lr` (cosine over the remaining pseudo-batches, no clipping), spec 4.2.
    sr_pseudo_batches: int = 0
    # How the SR phase's pseudo-batch is compiled: "host" jits one SR student step and loops over
    # it in Python (compiles in ~1/10 of the time of "unroll", same values); see make_pseudo_batch.
    sr_fuse: str = "host"
    # A memory for the SR phase (a departure from the reference, docs/ABD_SR.md "A memory of
    # generator samples for the SR phase"): `sr_memory` generator samples pooled evenly over the
    # main run's pseudo-batches (after any vaccine warm-up), of which `sr_memory_share` of every SR
    # batch is drawn (`zskt.mix_in_memory`). 0: the SR phase sees the current generator only.
    sr_memory: int = 0
    sr_memory_share: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sr_memory < 0 or not 0.0 <= self.sr_memory_share <= 1.0:
            raise ValueError(f"sr_memory = {self.sr_memory}, sr_memory_share = {self.sr_memory_share}: the memory "
                             "holds >= 0 images (0 = off) and its share of an SR batch is in [0, 1]")
        if self.sr_memory and round(self.sr_memory_share * self.batch_size) > self.sr_memory:
            raise ValueError(f"sr_memory = {self.sr_memory} images cannot fill {self.sr_memory_share} of a batch of "
                             f"{self.batch_size}; raise sr_memory or lower sr_memory_share")
        # Checked here, not where each field is first used: sr_fuse and sr_trigger_model are only
        # read when the SR phase starts, after the whole main run.
        choices = {
            "method": METHODS,
            "student_optimizer": ("adam", "sgd"),
            "student": MODEL_NAMES,
            "schedule": ("cosine", "constant"),
            "generator_out": tuple(sorted(_OUT_ACTIVATIONS)),
            "generator_upsample": ("fused", "separate"),
            "fuse": ("unroll", "scan", "host"),
            "sr_fuse": ("unroll", "scan", "host"),
            "sr_trigger_model": ("teacher", "student"),
        }
        for field, known in choices.items():
            value = getattr(self, field)
            if value not in known:
                raise ValueError(
                    f"unknown ZSKT {field} {value!r}; set zskt.{field} (--config.zskt.{field}=...) "
                    f"to one of: {', '.join(known)}"
                )


@dataclasses.dataclass
class ZSKTResult:
    student: Any
    state: ZSKTState
    history: list[dict[str, float]]
    seconds_per_step: float
    samples: np.ndarray  # uint8 [64, H, W, 3] generator samples at the end
    # With SV: the per-sample suspicion report (teacher vs shuffled copies) on synthetic samples
    # of the final generator and on the clean / triggered test images; see `sv_report`.
    suspicion: dict[str, dict[str, np.ndarray]] | None = None
    # With `sv_verify_after`: one `tail_statistics` record per shuffle tried (spec 3.4).
    sv_verification: list[dict[str, float]] | None = None


def per_pseudo_batch(schedule: optax.Schedule, updates_per_pb: int) -> optax.Schedule:
    """Steps a per-pseudo-batch schedule once per pseudo-batch, as the reference's scheduler."""
    return lambda count: schedule(count // updates_per_pb)


def sv_hooks(teacher, teacher_vars: PyTree, cfg: ZSKTConfig, key: jax.Array, hooks: DFKDHooks):
    """(hooks with the vaccine's penalty, initial vaccine state), or (hooks, None) without SV."""
    if not cfg.sv:
        return hooks, None
    state = init_shuffle_vaccine(key, teacher_vars, coef=cfg.sv_coef, n_copies=cfg.sv_copies,
                                 n_layers=cfg.sv_layers, verify=cfg.sv_verify_after > 0,
                                 share_prefix=cfg.sv_share_prefix)
    return with_sv_penalty(hooks, teacher, cfg), state


def with_sv_penalty(hooks: DFKDHooks, teacher, cfg: ZSKTConfig) -> DFKDHooks:
    """`hooks` with the vaccine's generator penalty. For ZSKT with `sv_share_teacher` the penalty
    comes as `teacher_and_penalty`: the generator step's teacher forward and the shuffled copies
    then share the unshuffled prefix (same values, gradients summed in another order; the paper-size
    ZSKT+SV pseudo-batch compiles to 370 instead of 403 GFLOP, docs/PERFORMANCE.md). DFAD / DAFL
    objectives read the teacher their own way and take the plain penalty."""
    if cfg.sv_share_teacher and cfg.method == "zskt":
        return hooks._replace(teacher_and_penalty=make_teacher_and_penalty(teacher))
    return hooks._replace(generator_penalty=sv_penalty_hook(teacher))


def sv_penalty_hook(teacher):
    """The SV generator penalty for ZSKT, computed without `lax.cond`: under the cond the ZSKT+SV
    pseudo-batch ran at 2.9 s on XLA:CPU, without it 2.4 s, and 1.6 s once the ensemble also
    looped over its copies (docs/ABD_SV.md, "Speed on XLA:CPU"). With coef = 0 (verification
    warm-up) the penalty is then computed and multiplied by 0, which leaves the generator's update
    unchanged."""
    return make_generator_penalty(teacher, skip_when_off=False)


def sr_hook(teacher, student, cfg: ZSKTConfig):
    """The Self-Retrospection hooks (spec 4.1): `(student_sr, student_sr_prepare, student_sr_stats)`.

    With the teacher as trigger model (the released sweeps) the trigger depends only on the images
    and the frozen teacher, so `student_sr_prepare` synthesizes it once per pseudo-batch and
    `student_sr` computes the hypergradient from it on each student step (the same values as
    synthesizing it on every step, 10x fewer trigger rounds). With the student as trigger model
    the trigger changes with every student update and is synthesized inside `student_sr`.
    `student_sr_stats` (with `cfg.sr_bn_replay` and the teacher's trigger; else None) replays the
    BN running-stat updates of the reference's SR forwards before the KD forward. With
    `cfg.sr_refine_rounds` > 0 `student_sr_prepare` also refines the teacher's trigger on the
    student as it stands at the pseudo-batch's start (`refine_on_student`).
    """
    if cfg.sr_trigger_model not in ("teacher", "student"):
        raise ValueError(f"sr_trigger_model must be 'teacher' or 'student', got {cfg.sr_trigger_model!r}")
    student_apply = train_mode_apply(student)
    kw = dict(portion=cfg.sr_portion, fp_iterations=cfg.sr_fp_iterations, l2=cfg.sr_l2,
              temperature=cfg.temperature)

    def prepare(teacher_vars: PyTree, x: jax.Array, key: jax.Array | None = None,
                student_vars: PyTree | None = None) -> jax.Array:
        def teacher_logits(inputs):
            return teacher.apply(teacher_vars, inputs, train=False)[0]

        delta = synthesize_trigger(teacher_logits, x, rounds=cfg.sr_rounds, lr=cfg.sr_pert_lr, l2=cfg.sr_l2,
                                   temperature=cfg.temperature, init_scale=cfg.sr_init_scale,
                                   init_key=trigger_start_key(cfg, key), restarts=cfg.sr_restarts,
                                   max_norm=cfg.sr_max_norm)
        return refine_on_student(cfg, student, student_vars, teacher_logits, x, delta, l2=cfg.sr_l2)

    def student_sr(student_vars: PyTree, teacher_vars: PyTree, x: jax.Array, key: jax.Array, delta=None):
        if delta is None:  # the student synthesizes its own trigger
            grads, _ = retrospect(student_apply, student_vars, x, key, trigger_logits_fn="student",
                                  rounds=cfg.sr_rounds, pert_lr=cfg.sr_pert_lr, trigger_l2=cfg.sr_l2,
                                  trigger_init_scale=cfg.sr_init_scale, trigger_restarts=cfg.sr_restarts,
                                  trigger_max_norm=cfg.sr_max_norm, **kw)
        else:
            grads, _ = sr_grads(student_apply, student_vars, x, delta, key, **kw)
        return grads

    return student_sr, (prepare if cfg.sr_trigger_model == "teacher" else None), sr_stats_hook(student, cfg)


def _lr(cfg: ZSKTConfig, base: float, updates_per_pb: int):
    """The spec's cosine over the run, stepped once per pseudo-batch, or a constant."""
    if cfg.schedule == "constant":
        return base
    if cfg.schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
    return per_pseudo_batch(cosine_schedule(base, cfg.pseudo_batches), updates_per_pb)


def _generator_tx(cfg: ZSKTConfig) -> optax.GradientTransformation:
    return make_optimizer("adam", _lr(cfg, cfg.lr_generator, 1), clip_norm=cfg.clip_norm)


def _student_tx(cfg: ZSKTConfig) -> optax.GradientTransformation:
    """Adam (spec 6.1) or SGD (DFAD / DAFL), cosine stepped once per pseudo-batch, clipped at
    `clip_norm` (> 0). With the ZSKT defaults this is exactly the spec's Adam + clip 5."""
    kw = dict(clip_norm=cfg.clip_norm, weight_decay=cfg.student_weight_decay)
    if cfg.student_optimizer == "sgd":
        kw["momentum"] = cfg.student_momentum
    return make_optimizer(cfg.student_optimizer, _lr(cfg, cfg.lr_student, cfg.n_student_steps), **kw)


def build_zskt(teacher, dataset: Dataset, cfg: ZSKTConfig, seed: int, hooks: DFKDHooks = DFKDHooks(),
               teacher_vars: PyTree = None):
    """Returns (student module, generator module, initial ZSKTState, pseudo_batch fn).

    With `cfg.sv` the Shuffling Vaccine hook is added (its state in `ZSKTState.hook_state`, built
    from `teacher_vars`); the SR phase is built separately by `sr_phase`.
    """
    size, _, channels = dataset.image_shape
    if teacher_vars is not None:
        check_classifier_fits(teacher, teacher_vars, dataset.image_shape, dataset.num_classes)
    student = get_model(cfg.student, num_classes=dataset.num_classes)
    generator = Generator(z_dim=cfg.z_dim, image_size=size, channels=channels,
                          width=cfg.generator_width, out_activation=cfg.generator_out,
                          fused_upsample=cfg.generator_upsample == "fused")
    k_s, k_g, k_run = jax.random.split(jax.random.key(seed), 3)
    s_vars = init_model(student, k_s, dataset.image_shape)
    g_vars = generator.init(k_g, jnp.zeros((2, cfg.z_dim)), train=False)

    hooks, sv_state = sv_hooks(teacher, teacher_vars, cfg, jax.random.fold_in(k_run, 3), hooks)
    s_tx = _student_tx(cfg)
    g_tx = _generator_tx(cfg)
    state = ZSKTState(
        student=create_train_state(s_vars, s_tx, jax.random.fold_in(k_run, 1)),
        generator=create_train_state(g_vars, g_tx, jax.random.fold_in(k_run, 2)),
        step=jnp.zeros((), jnp.int32),
        key=k_run,
        hook_state=sv_state,
    )
    step = _pseudo_batch_fn(teacher, student, generator, s_tx, g_tx, cfg, hooks)
    return student, generator, state, step


def _pseudo_batch_fn(teacher, student, generator, s_tx, g_tx, cfg: ZSKTConfig, hooks: DFKDHooks,
                     fuse: str | None = None, memory_share: float = 0.0):
    objective, student_loss = method_losses(cfg.method, temperature=cfg.temperature, dafl_oh=cfg.dafl_oh,
                                            dafl_act=cfg.dafl_act, dafl_balance=cfg.dafl_balance)
    return make_pseudo_batch(
        teacher, student, generator, s_tx, g_tx, batch_size=cfg.batch_size, z_dim=cfg.z_dim,
        n_student_steps=cfg.n_student_steps, temperature=cfg.temperature, beta=cfg.beta,
        hooks=hooks, fuse=fuse or cfg.fuse, scan_unroll=cfg.scan_unroll,
        generator_objective=objective, student_loss=student_loss, memory_share=memory_share,
    )


def sr_phase(teacher, student, generator, state: ZSKTState, cfg: ZSKTConfig, hooks: DFKDHooks,
             memory: np.ndarray | None = None):
    """The SR resume of spec 4.2: the student gets a fresh `self_retrospection` + Adam optimizer
    (cosine from `sr_resume_lr` over the remaining pseudo-batches, no clipping); the generator,
    its optimizer and schedule, and the vaccine state carry on. Returns (state, pseudo_batch fn);
    with `cfg.sr_fuse == "host"` the function compiles its own pieces (do not wrap it in jax.jit).
    `memory` (from `memory_pool`, with `cfg.sr_memory`): images that fill `cfg.sr_memory_share` of
    every SR batch, carried in the state (`ZSKTState.memory`)."""
    s_tx = sr_resume_optimizer(cfg.sr_resume_lr, cfg.sr_pseudo_batches,
                               updates_per_step=cfg.n_student_steps, coef=cfg.sr_coef)
    student_state = state.student.replace(opt_state=s_tx.init(state.student.params))
    g_tx = _generator_tx(cfg)  # the same transformation as before the resume: its state carries on
    student_sr, prepare, sr_stats = sr_hook(teacher, student, cfg)
    hooks = hooks._replace(student_sr=student_sr, student_sr_prepare=prepare, student_sr_stats=sr_stats)
    share = cfg.sr_memory_share if memory is not None else 0.0
    step = _pseudo_batch_fn(teacher, student, generator, s_tx, g_tx, cfg, hooks, fuse=cfg.sr_fuse,
                            memory_share=share)
    state = state.replace(student=student_state)
    return (state.replace(memory=jnp.asarray(memory)) if memory is not None else state), step


def memory_pool(generator, cfg: ZSKTConfig, seed: int, start: int, stop: int, g_state_like: Any):
    """The SR phase's memory (`cfg.sr_memory` images), pooled after pseudo-batches start..stop-1:
    returns (host_state {"x": [M, H, W, C]}, on_step) for `run_steps` (which checkpoints and
    restores the pool with the run), or (None, None) without a memory. After pseudo-batch i the
    generator's fresh samples fill rows [M (i-start) / n, M (i-start+1) / n), n = stop - start, so
    the memory spreads evenly over the run; drawn with their own key (from the run's `seed`), they
    leave the run as it was."""
    if not cfg.sr_memory or stop <= start:
        return None, None
    key = jax.random.key(seed + 4)  # seed .. seed + 3 key the run's other streams
    n, m = stop - start, cfg.sr_memory
    per = -(-m // n)  # the most rows one pseudo-batch fills
    sample = jax.jit(lambda g, k: sample_images(generator, g, k, per, cfg.z_dim))
    pool = {"x": np.zeros((m, *jax.eval_shape(sample, g_state_like, key).shape[1:]), np.float32)}

    def collect(i: int, s: ZSKTState) -> None:
        if start <= i < stop:
            lo, hi = m * (i - start) // n, m * (i - start + 1) // n
            if hi > lo:
                pool["x"][lo:hi] = np.asarray(sample(s.generator, jax.random.fold_in(key, i)))[: hi - lo]

    return pool, collect


def sv_report(teacher, teacher_vars: PyTree, generator, state: ZSKTState, dataset: Dataset,
              eval_sets: EvalSets, cfg: ZSKTConfig, key: jax.Array, n_synthetic: int = 256):
    """What the vaccine flags at the end of an SV run (`suspicion_reports`): 256 fresh synthetic
    samples (the data SV acts on) and, for diagnosis only, the clean and triggered test images
    (which a defender would not have; the reference logs the same at start-up, spec 3.4)."""
    synthetic = sample_images(generator, state.generator, key, n_synthetic, cfg.z_dim)
    batches = {
        "synthetic": np.asarray(synthetic),
        **normalized_test_images(eval_sets, dataset.mean, dataset.std),
    }
    return suspicion_reports(teacher, teacher_vars, state.hook_state, batches)


def warm_up_pool(step, state: ZSKTState, teacher, teacher_vars: PyTree, generator, cfg: ZSKTConfig,
                 key: jax.Array, run_kwargs: dict):
    """The warm-up of spec 3.4 in ZSKT: P = `sv_verify_after` pseudo-batches with SV off (coef 0),
    pooling one batch of generator samples after each pseudo-batch from the 11th on (the reference
    pools the pseudo-batch's own images, 11 identical copies each; a fresh z from the same
    generator is the same distribution, and duplicates do not change the tail ratio).
    Returns (state, warm-up evaluation history, pooled images [N, ...], their teacher logits [N, C])."""
    first_pooled = min(11, cfg.sv_verify_after - 1)
    sample = jax.jit(lambda g, k: sample_images(generator, g, k, cfg.batch_size, cfg.z_dim))
    t_logits = jax.jit(lambda tv, x: teacher.apply(tv, x, train=False)[0])
    # Preallocated, so a checkpoint of the warm-up can hold (and restore) the pool filled so far.
    x0 = jax.eval_shape(sample, state.generator, key)
    n = cfg.sv_verify_after - first_pooled
    pool = {"x": np.zeros((n, *x0.shape), x0.dtype),
            "t": np.zeros((n, *jax.eval_shape(t_logits, teacher_vars, x0).shape), np.float32)}

    def collect(i: int, s: ZSKTState) -> None:
        if i >= first_pooled:
            x = sample(s.generator, jax.random.fold_in(key, i))
            pool["x"][i - first_pooled] = np.asarray(x)
            pool["t"][i - first_pooled] = np.asarray(t_logits(teacher_vars, x))

    state, history = run_steps(step, state, teacher_vars, num_steps=cfg.sv_verify_after, on_step=collect,
                               host_state=pool, **run_kwargs)
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    return state, history, flat(pool["x"]), flat(pool["t"])


def _warm_up_and_verify(step, state: ZSKTState, teacher, teacher_vars: PyTree, generator, cfg: ZSKTConfig,
                        key: jax.Array, run_kwargs: dict):
    """`warm_up_pool`, then `verify_vaccine` on the pool. Returns (state with the verified vaccine,
    warm-up evaluation history, per-trial log)."""
    state, history, pool_x, pool_t = warm_up_pool(step, state, teacher, teacher_vars, generator, cfg, key,
                                                  run_kwargs)
    divergence = jax.jit(make_divergence_fn(teacher))
    sv, log = verify_vaccine(jax.random.fold_in(key, cfg.sv_verify_after), divergence, pool_x, pool_t,
                             state.hook_state, n_layers=cfg.sv_layers, threshold=cfg.sv_verify_threshold)
    return state.replace(hook_state=sv), history, log


def samples_to_pixels(x: jax.Array, mean, std) -> np.ndarray:
    """Normalized generator output -> uint8 pixel images for display."""
    return np.asarray(jnp.clip(jnp.round(denormalize(x, mean, std)), 0, 255)).astype(np.uint8)


def distill_zskt(
    teacher,
    teacher_vars: PyTree,
    dataset: Dataset,
    eval_sets: EvalSets,
    cfg: ZSKTConfig,
    *,
    seed: int = 0,
    hooks: DFKDHooks = DFKDHooks(),
    desc: str = "zskt",
    on_eval: Callable[[int, ZSKTState, dict[str, float]], None] | None = None,
    checkpoint: CheckpointPolicy | None = None,
    mesh: Mesh | None = None,
) -> ZSKTResult:
    """Runs `cfg.pseudo_batches` ZSKT pseudo-batches and evaluates the student periodically.

    With ABD options (`cfg.sv`, `cfg.sr_pseudo_batches`) the vaccine is active throughout and the
    last `sr_pseudo_batches` run with Self-Retrospection, as the reference's resumed SR job.
    `checkpoint`: where each phase checkpoints, and whether to resume (abd_jax.resume); `mesh`:
    data parallelism over a device mesh (abd_jax.parallel).
    """
    ending = "sr" if cfg.sr_pseudo_batches else "plain"
    return distill_zskt_branches(teacher, teacher_vars, dataset, eval_sets, cfg, seed=seed, hooks=hooks,
                                 desc=desc, on_eval=on_eval, endings=(ending,), checkpoint=checkpoint,
                                 mesh=mesh)[ending]


def distill_zskt_branches(
    teacher,
    teacher_vars: PyTree,
    dataset: Dataset,
    eval_sets: EvalSets,
    cfg: ZSKTConfig,
    *,
    seed: int = 0,
    hooks: DFKDHooks = DFKDHooks(),
    desc: str = "zskt",
    on_eval: Callable[[int, ZSKTState, dict[str, float]], None] | None = None,
    endings: tuple[str, ...] = ("plain", "sr"),
    checkpoint: CheckpointPolicy | None = None,
    mesh: Mesh | None = None,
) -> dict[str, ZSKTResult]:
    """One ZSKT run up to pseudo-batch N - k (k = `cfg.sr_pseudo_batches`), then one or both
    endings over the last k: "plain" carries on unchanged, "sr" resumes with Self-Retrospection
    (spec 4.2). Sharing the first N - k pseudo-batches is how the reference's SR job resumes a
    vanilla (or SV) checkpoint, and it halves the cost of reporting both rows.
    """
    _check_sr_length(cfg)
    unknown = set(endings) - {"plain", "sr"}
    if unknown:
        raise ValueError(f"unknown endings {sorted(unknown)}; use 'plain' and/or 'sr'")
    student, generator, state, step = build_zskt(teacher, dataset, cfg, seed, hooks, teacher_vars)
    run = _run_context(teacher, teacher_vars, dataset, eval_sets, cfg, seed, student, generator, hooks, desc, on_eval,
                       checkpoint=checkpoint, mesh=mesh)
    t0 = time.perf_counter()
    history, verification, start = [], None, 0
    if cfg.sv and cfg.sv_verify_after > 0:
        state, history, verification = _warm_up_and_verify(step, state, teacher, teacher_vars, generator, cfg,
                                                           jax.random.key(seed + 3), run.run_kwargs())
        start = cfg.sv_verify_after
    return _finish_branches(run, step, state, history, start, t0, endings, verification)


class _RunContext(NamedTuple):
    """What the pieces of one ZSKT run share (its modules, data, config and reporting)."""

    teacher: Any
    teacher_vars: PyTree
    dataset: Dataset
    eval_sets: EvalSets
    cfg: ZSKTConfig
    seed: int
    student: Any
    generator: Any
    hooks: DFKDHooks
    desc: str
    on_eval: Callable[[int, ZSKTState, dict[str, float]], None] | None
    evaluate: Callable[[ZSKTState], dict[str, float]]
    checkpoint: CheckpointPolicy | None
    mesh: Mesh | None

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every or max(self.cfg.pseudo_batches // 10, 1)

    def run_kwargs(self) -> dict:
        return dict(evaluate=self.evaluate, eval_every=self.eval_every, desc=self.desc, on_eval=self.on_eval,
                    checkpoint=self.checkpoint, mesh=self.mesh)


def _run_context(teacher, teacher_vars, dataset, eval_sets, cfg, seed, student, generator, hooks, desc,
                 on_eval, evaluate: Callable[[ZSKTState], dict[str, float]] | None = None,
                 checkpoint: CheckpointPolicy | None = None, mesh: Mesh | None = None) -> _RunContext:
    if evaluate is None:
        ev = evaluator(student, dataset.mean, dataset.std, eval_sets)  # built (and compiled) once per run
        evaluate = lambda s: ev(s.student.variables)  # noqa: E731
    return _RunContext(teacher, teacher_vars, dataset, eval_sets, cfg, seed, student, generator, hooks, desc,
                       on_eval, evaluate, checkpoint, mesh)


def _check_sr_length(cfg: ZSKTConfig) -> None:
    if not 0 <= cfg.sr_pseudo_batches <= cfg.pseudo_batches:
        raise ValueError(f"sr_pseudo_batches must be in [0, {cfg.pseudo_batches}], got {cfg.sr_pseudo_batches}")
    main_steps = cfg.pseudo_batches - cfg.sr_pseudo_batches
    if cfg.sv and cfg.sv_verify_after > 0 and not 1 < cfg.sv_verify_after <= main_steps:
        raise ValueError(f"sv_verify_after must be in [2, {main_steps}] (the pseudo-batches before SR), "
                         f"got {cfg.sv_verify_after}")


def _finish_branches(run: _RunContext, step, state: ZSKTState, history: list[dict], start: int, t0: float,
                     endings: tuple[str, ...], verification: list[dict] | None) -> dict[str, ZSKTResult]:
    """Runs pseudo-batches start..N-k-1 with `step`, then each ending over the last k (see
    `distill_zskt_branches`). `t0` is when the run (including any shared warm-up) started."""
    cfg, teacher, tv = run.cfg, run.teacher, run.teacher_vars
    main_steps = cfg.pseudo_batches - cfg.sr_pseudo_batches
    sr_ending = "sr" in endings and main_steps < cfg.pseudo_batches
    pool, collect = (memory_pool(run.generator, cfg, run.seed, start, main_steps, state.generator)
                     if sr_ending else (None, None))
    state, more = run_steps(step, state, tv, num_steps=main_steps, start_step=start, on_step=collect,
                            host_state=pool, **run.run_kwargs())
    history = history + more
    main_s = time.perf_counter() - t0
    results = {}
    for ending in endings:
        t1 = time.perf_counter()
        end_state, end_history = state, []
        if ending == "plain" and main_steps < cfg.pseudo_batches:
            end_state, end_history = run_steps(step, state, tv, num_steps=cfg.pseudo_batches, start_step=main_steps,
                                               **run.run_kwargs())
        elif ending == "sr" and main_steps < cfg.pseudo_batches:
            sr_hooks = with_sv_penalty(run.hooks, teacher, cfg) if cfg.sv else run.hooks
            end_state, sr_step = sr_phase(teacher, run.student, run.generator, state, cfg, sr_hooks,
                                          memory=pool["x"] if pool is not None else None)
            end_state, end_history = run_steps(
                sr_step, end_state, tv, num_steps=cfg.pseudo_batches, start_step=main_steps,
                **{**run.run_kwargs(), "desc": f"{run.desc} (SR)",
                   "eval_every": max(min(run.eval_every, cfg.sr_pseudo_batches // 2), 1)},
                jit_step=cfg.sr_fuse != "host")
            end_history = [{**h, "sr": 1.0} for h in end_history]
        seconds = (main_s + time.perf_counter() - t1) / max(cfg.pseudo_batches, 1)
        results[ending] = _result(run, end_state, history + end_history, seconds, verification)
    return results


def _result(run: _RunContext, state: ZSKTState, history: list[dict], seconds: float,
            verification: list[dict] | None) -> ZSKTResult:
    """A finished ZSKT row: final samples and, for an SV run, its suspicion report. A run without
    SV may have carried the vaccine state untouched (a shared warm-up); its row drops it."""
    cfg = run.cfg
    x = sample_images(run.generator, state.generator, jax.random.key(run.seed + 1), 64, cfg.z_dim)
    report = _suspicion(run, state) if cfg.sv else None
    state = state if cfg.sv else state.replace(hook_state=None)
    return ZSKTResult(run.student, state, history, seconds,
                      samples_to_pixels(x, run.dataset.mean, run.dataset.std), report, verification)


def _suspicion(run: _RunContext, state: ZSKTState) -> dict[str, dict[str, np.ndarray]]:
    return sv_report(run.teacher, run.teacher_vars, run.generator, state, run.dataset, run.eval_sets, run.cfg,
                     jax.random.key(run.seed + 2))


def distill_zskt_ablation(
    teacher,
    teacher_vars: PyTree,
    dataset: Dataset,
    eval_sets: EvalSets,
    cfg: ZSKTConfig,
    *,
    seed: int = 0,
    on_eval: Callable[[int, ZSKTState, dict[str, float]], None] | None = None,
    checkpoint: CheckpointPolicy | None = None,
    mesh: Mesh | None = None,
) -> dict[str, ZSKTResult]:
    """The four ZSKT rows of the ABD ablation (spec 9.4): "zskt", "zskt+sr", "zskt+sv" and
    "zskt+abd" (`cfg.sv` is ignored; the SR rows only with `cfg.sr_pseudo_batches` > 0, the SR
    phase length).

    Without verification (`sv_verify_after` = 0) these are two runs, vanilla and SV, each with
    both endings. With verification the SV run's warm-up has SV off (coefficient 0), so it IS
    the vanilla run's first P pseudo-batches: both rows share them, with the samples pooled for
    the tail-ratio test along the way. If the vaccine passes, the SV run goes on from
    pseudo-batch P with its verified vaccine; if every shuffle fails, SV stays off for good
    (spec 3.4 step 3), so the SV run would be the vanilla run: its rows are the vanilla rows
    (same states and histories), with the rejected vaccine's verification log and suspicion
    report attached. Test: tests/test_abd_zskt.py checks both cases against a standalone SV run.
    """
    endings = ("plain", "sr") if cfg.sr_pseudo_batches > 0 else ("plain",)
    vanilla_cfg, sv_cfg = dataclasses.replace(cfg, sv=False), dataclasses.replace(cfg, sv=True)
    names = {"plain": ("zskt", "zskt+sv"), "sr": ("zskt+sr", "zskt+abd")}
    if cfg.sv_verify_after <= 0:
        plain = distill_zskt_branches(teacher, teacher_vars, dataset, eval_sets, vanilla_cfg, seed=seed,
                                      desc="zskt", on_eval=on_eval, endings=endings, checkpoint=checkpoint,
                                      mesh=mesh)
        sv = distill_zskt_branches(teacher, teacher_vars, dataset, eval_sets, sv_cfg, seed=seed,
                                   desc="zskt+sv", on_eval=on_eval, endings=endings, checkpoint=checkpoint,
                                   mesh=mesh)
        return {**{names[e][0]: r for e, r in plain.items()}, **{names[e][1]: r for e, r in sv.items()}}
    _check_sr_length(sv_cfg)
    # Same seed, so the same student, generator and keys; the SV build adds the vaccine state.
    _, _, _, vanilla_step = build_zskt(teacher, dataset, vanilla_cfg, seed, DFKDHooks(), teacher_vars)
    student, generator, state, sv_step = build_zskt(teacher, dataset, sv_cfg, seed, DFKDHooks(), teacher_vars)
    ctx = dict(teacher=teacher, teacher_vars=teacher_vars, dataset=dataset, eval_sets=eval_sets, seed=seed,
               student=student, generator=generator, hooks=DFKDHooks(), on_eval=on_eval, checkpoint=checkpoint,
               mesh=mesh)
    vanilla_run = _run_context(cfg=vanilla_cfg, desc="zskt", **ctx)
    sv_run = _run_context(cfg=sv_cfg, desc="zskt+sv", evaluate=vanilla_run.evaluate, **ctx)
    t0 = time.perf_counter()
    state, history, log = _warm_up_and_verify(vanilla_step, state, teacher, teacher_vars, generator, sv_cfg,
                                              jax.random.key(seed + 3), vanilla_run.run_kwargs())
    t_warm = time.perf_counter() - t0
    start, vaccine = sv_cfg.sv_verify_after, state.hook_state
    # The vanilla step carries the (unused) vaccine state along, so its warm-up compile is reused.
    plain = _finish_branches(vanilla_run, vanilla_step, state, history, start, t0, endings, None)
    if any(r["passed"] for r in log):  # t0 shifted so the SV rows' timing includes the shared warm-up
        sv = _finish_branches(sv_run, sv_step, state, history, start, time.perf_counter() - t_warm, endings, log)
    else:
        # The vanilla rows as they are (samples included), plus the rejected vaccine and its report.
        sv = {}
        for e, r in plain.items():
            with_vaccine = r.state.replace(hook_state=vaccine)
            sv[e] = dataclasses.replace(r, state=with_vaccine, suspicion=_suspicion(sv_run, with_vaccine),
                                        sv_verification=log)
    return {**{names[e][0]: r for e, r in plain.items()}, **{names[e][1]: r for e, r in sv.items()}}
