"""Zero-Shot Knowledge Transfer (Micaelli & Storkey 2019), spec 6.1, as one jitted pseudo-batch.

A pseudo-batch draws a fresh z, takes one adversarial generator step (maximize KL(T||S)), then
`n_student_steps` student steps on the images G(z) (KL + beta * attention transfer). DFAD and DAFL
share this shape with other losses (`generator_objective`, `student_loss`; see
abd_jax/kd/generator_losses.py), and so get the same ABD hooks.

Deliberate departure from the reference code: the reference recomputes G(z) and the teacher's
outputs before every student step. Inside a pseudo-batch neither changes (G is not updated during
the student steps, the teacher is frozen and in eval mode), so we compute both once per
pseudo-batch. `recompute=True` restores the reference's behaviour; a test checks both give the same
student update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from abd_jax.kd.common import DFKDHooks, Metrics, apply_gradients, forward, kd_loss, sr_stats_state, with_hook_state
from abd_jax.kd.generator_losses import GeneratorObjective, StudentLossFn, penultimate_apply
from abd_jax.losses import kl_elementwise
from abd_jax.parallel import constrain_batch
from abd_jax.state import TrainState

PyTree = Any


class ZSKTState(struct.PyTreeNode):
    """Everything a ZSKT run carries from one pseudo-batch to the next."""

    student: TrainState
    generator: TrainState
    step: jax.Array  # pseudo-batch index
    key: jax.Array
    hook_state: Any = None  # e.g. the Shuffling Vaccine's state; None for vanilla ZSKT
    # Generator samples pooled over the main run [M, H, W, C] that the SR phase mixes into its
    # batches (ZSKTConfig.sr_memory, `mix_in_memory`); None otherwise, which adds no leaves, so
    # states and checkpoints without a memory are as before.
    memory: Any = None


def mix_in_memory(x: jax.Array, memory: jax.Array, key: jax.Array, share: float) -> jax.Array:
    """x with its last round(share * B) rows replaced by distinct memory rows drawn with `key`.

    Why: ZSKT's student sees only the current generator's batch, and by the end of a run the
    generator may make a few classes only (on one quickstart seed five classes were under 1% of its
    samples); a resumed SR phase, a fresh optimizer at a real learning rate, then makes the
    student forget the rest. Earlier samples keep those classes in its batches (docs/ABD_SR.md
    "A memory of generator samples for the SR phase"). Static shapes; share 0 returns x.
    """
    n = int(round(share * x.shape[0]))
    if n == 0:
        return x
    idx = jax.random.choice(key, memory.shape[0], (n,), replace=False)
    return jnp.concatenate([x[: x.shape[0] - n], memory[idx].astype(x.dtype)], axis=0)


def make_pseudo_batch(
    teacher: nn.Module,
    student: nn.Module,
    generator: nn.Module,
    student_tx: optax.GradientTransformation,
    generator_tx: optax.GradientTransformation,
    *,
    batch_size: int = 128,
    z_dim: int = 100,
    n_generator_steps: int = 1,
    n_student_steps: int = 10,
    temperature: float = 1.0,
    beta: float = 250.0,
    hooks: DFKDHooks = DFKDHooks(),
    fuse: str = "unroll",
    scan_unroll: int = 1,
    recompute: bool = False,
    generator_objective: GeneratorObjective | None = None,
    student_loss: StudentLossFn | None = None,
    memory_share: float = 0.0,
) -> Callable[[ZSKTState, PyTree], tuple[ZSKTState, Metrics]]:
    """Returns `pseudo_batch(state, teacher_variables) -> (state, metrics)`; not jitted.

    Args:
      teacher, student, generator: flax modules; classifiers return (logits, stage features).
      student_tx, generator_tx: optax transformations (spec: Adam + cosine + clip 5).
      n_student_steps: student updates per pseudo-batch (spec: 10).
      temperature: KL temperature tau (spec: 1 on CIFAR-10, 0.5 on GTSRB).
      beta: attention-transfer weight (spec: 250 on CIFAR-10, 0 on GTSRB).
      hooks: ABD extension points; `generator_penalty` is added to the generator loss (spec 3.3).
      fuse: "unroll" (a Python loop inside the one jit) or "scan" (`lax.scan` with `scan_unroll`).
        On XLA:CPU the scan measured far slower (docs/ZSKT.md, "Fusing"); unroll is the default.
        "host": the generator half and one student step are jitted separately and the pseudo-
        batch is a Python loop over them (the returned function is then already compiled piece
        by piece: call it without jax.jit). For heavy student steps (Self-Retrospection) it
        compiles one student step instead of ten at no measurable dispatch cost.
      recompute: recompute G(z) and the teacher outputs before every student step (reference
        behaviour; slower, same result).
      generator_objective: the generator loss of another method sharing this pseudo-batch (DFAD,
        DAFL: `abd_jax.kd.generator_losses.method_losses`); None is ZSKT's -KL_tau(T||S), the
        code path unchanged. The SV penalty is added to either.
      student_loss: `(t_logits, t_feats, s_logits, s_feats) -> (loss, metrics)` replacing ZSKT's
        KL_tau + beta * AT (`kd_loss`, the default when None).
      memory_share: with a `state.memory`, this share of each student batch comes from it
        (`mix_in_memory`; the teacher's outputs are computed on the mixed batch). The generator
        step still sees G(z) alone.
    """
    if fuse not in ("unroll", "scan", "host"):
        raise ValueError(f"fuse must be 'unroll', 'scan' or 'host', got {fuse!r}")
    if fuse == "host" and recompute:
        raise ValueError("recompute=True needs fuse='unroll'")
    if hooks.teacher_and_penalty is not None and (hooks.generator_penalty is not None
                                                  or generator_objective is not None):
        raise ValueError("hooks.teacher_and_penalty replaces ZSKT's teacher forward and generator_penalty: "
                         "give generator_penalty alone, not both, and not with a generator_objective")

    def teacher_out(teacher_vars: PyTree, x: jax.Array):
        return teacher.apply(teacher_vars, x, train=False)

    def other_generator_loss(state: ZSKTState, teacher_vars: PyTree, x: jax.Array):
        """`generator_objective` on G(z): (loss, teacher logits, student BN stats, metrics)."""
        t_pen = None
        if generator_objective.uses_penultimate:
            (t_logits, _), t_pen = penultimate_apply(teacher)(teacher_vars, x, train=False)
        else:
            t_logits, _ = teacher_out(teacher_vars, x)
        s_logits, s_stats = None, state.student.batch_stats
        if generator_objective.uses_student:  # train mode, as the DFAD reference's generator step
            (s_logits, _), s_stats = forward(student, state.student, x, train=True)
        loss, metrics = generator_objective.loss(t_logits, s_logits, t_pen)
        return loss, t_logits, s_stats, dict(metrics)

    def generator_step(state: ZSKTState, teacher_vars: PyTree, z: jax.Array, key: jax.Array):
        def loss_fn(g_params):
            g_state = state.generator.replace(params=g_params)
            x, g_stats = forward(generator, g_state, z, train=True)
            if generator_objective is None:  # ZSKT (spec 6.1): maximize KL_tau(T||S)
                shared, metrics = None, {}
                if hooks.teacher_and_penalty is not None:  # the teacher's forward shared with the penalty
                    (t_logits, _), shared, metrics = hooks.teacher_and_penalty(
                        teacher_vars, x, key, *with_hook_state(state.hook_state))
                else:
                    t_logits, _ = teacher_out(teacher_vars, x)
                (s_logits, _), s_stats = forward(student, state.student, x, train=True)
                loss = -jnp.mean(kl_elementwise(t_logits, s_logits, temperature))
                if shared is not None:
                    loss = loss + shared
            else:
                loss, t_logits, s_stats, metrics = other_generator_loss(state, teacher_vars, x)
            if hooks.generator_penalty is not None:
                penalty, pen_metrics = hooks.generator_penalty(t_logits, x, key, *with_hook_state(state.hook_state))
                loss, metrics = loss + penalty, {**metrics, **pen_metrics}
            return loss, (g_stats, s_stats, metrics)

        (loss, (g_stats, s_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.generator.params
        )
        generator_state = apply_gradients(state.generator, generator_tx, grads, g_stats)
        # The reference's student forward in the generator step runs in train mode, which also
        # moves the student's BN running statistics; keep that side effect for fidelity.
        student_state = state.student.replace(batch_stats=s_stats)
        return state.replace(generator=generator_state, student=student_state), {"loss_g": loss, **metrics}

    def images_and_targets(state: ZSKTState, teacher_vars: PyTree, z: jax.Array):
        x, _ = forward(generator, state.generator, z, train=True)  # G is always in train mode
        x = jax.lax.stop_gradient(x)
        if state.memory is not None and memory_share > 0:
            # Its own stream (2): the z, penalty and SR keys of the pseudo-batch are unchanged.
            k_mem = jax.random.fold_in(jax.random.fold_in(state.key, state.step), 2)
            x = mix_in_memory(x, state.memory, k_mem, memory_share)
        x = constrain_batch(x)  # see `generator_half`
        t_logits, t_feats = teacher_out(teacher_vars, x)
        return x, t_logits, t_feats

    def student_step(s_state: TrainState, x: jax.Array, t_logits: jax.Array, t_feats, key: jax.Array,
                     teacher_vars: PyTree, prepared: Any = None):
        k_sr = jax.random.fold_in(key, s_state.step)
        kd_state = sr_stats_state(hooks, s_state, x, k_sr, prepared)  # SR's forwards come first, as in the reference

        def loss_fn(params):
            (s_logits, s_feats), stats = forward(student, kd_state.replace(params=params), x, train=True)
            if student_loss is None:
                loss, parts = kd_loss(t_logits, t_feats, s_logits, s_feats, temperature=temperature, beta=beta)
            else:
                loss, parts = student_loss(t_logits, t_feats, s_logits, s_feats)
            return loss, (stats, parts)

        (loss, (stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(s_state.params)
        extra = {}
        if hooks.student_sr is not None:  # Self-Retrospection: an extra gradient, spec 4.1
            # Computed here and passed as `sr_grads`, not as `sr_grad_fn`: a built SR phase always
            # runs SR, and the transform's lax.cond around `sr_grad_fn` made the same work 7x
            # slower on XLA:CPU (docs/ABD_SR.md, "Speed").
            extra["sr_grads"] = hooks.student_sr(s_state.variables, teacher_vars, x, k_sr, prepared)
        return apply_gradients(s_state, student_tx, grads, stats, **extra), {"loss_s": loss, **parts}

    def generator_half(state: ZSKTState, teacher_vars: PyTree):
        key = jax.random.fold_in(state.key, state.step)
        k_z, k_pen = jax.random.split(key)
        k_sr = jax.random.fold_in(key, 1)  # separate stream, so vanilla runs keep their z and keys
        # Data parallelism (abd_jax/parallel.py): the pseudo-batch has no batch argument, so under
        # a mesh mark z (and the images, in `images_and_targets`) batch-sharded, or GSPMD would
        # compute the whole batch on every device; everything computed from them follows. The
        # identity without a mesh. Same values either way: with jax_threefry_partitionable (on by
        # default) each device draws its slice of the same z (tests/test_parallel.py).
        z = constrain_batch(jax.random.normal(k_z, (batch_size, z_dim), jnp.float32))
        metrics: Metrics = {}
        for _ in range(n_generator_steps):
            state, metrics = generator_step(state, teacher_vars, z, k_pen)
        x, t_logits, t_feats = images_and_targets(state, teacher_vars, z)
        # What SR needs from the images (its teacher trigger, refined on the student as it stands
        # with `sr_refine_rounds`), once for the 10 student steps.
        prepared = (hooks.student_sr_prepare(teacher_vars, x, k_sr, state.student.variables)
                    if hooks.student_sr_prepare else None)
        return state, z, (x, t_logits, t_feats, prepared), k_sr, metrics

    def pseudo_batch(state: ZSKTState, teacher_vars: PyTree) -> tuple[ZSKTState, Metrics]:
        state, z, (x, t_logits, t_feats, prepared), k_sr, metrics = generator_half(state, teacher_vars)
        s_state = state.student
        if fuse == "unroll" or recompute:
            s_metrics: Metrics = {}
            for _ in range(n_student_steps):
                if recompute:
                    x, t_logits, t_feats = images_and_targets(state, teacher_vars, z)
                s_state, s_metrics = student_step(s_state, x, t_logits, t_feats, k_sr, teacher_vars, prepared)
        else:
            def body(carry: TrainState, _):
                return student_step(carry, x, t_logits, t_feats, k_sr, teacher_vars, prepared)

            s_state, stacked = jax.lax.scan(body, s_state, None, length=n_student_steps, unroll=scan_unroll)
            s_metrics = jax.tree.map(lambda v: v[-1], stacked)

        state = state.replace(student=s_state, step=state.step + 1)
        return state, {**metrics, **s_metrics}

    if fuse == "host":
        jit_generator_half = jax.jit(generator_half, donate_argnums=(0,))
        jit_student_step = jax.jit(student_step, donate_argnums=(0,))

        def pseudo_batch_host(state: ZSKTState, teacher_vars: PyTree) -> tuple[ZSKTState, Metrics]:
            state, _, (x, t_logits, t_feats, prepared), k_sr, metrics = jit_generator_half(state, teacher_vars)
            s_state, s_metrics = state.student, {}
            for _ in range(n_student_steps):
                s_state, s_metrics = jit_student_step(s_state, x, t_logits, t_feats, k_sr, teacher_vars, prepared)
            return state.replace(student=s_state, step=state.step + 1), {**metrics, **s_metrics}

        return pseudo_batch_host

    return pseudo_batch


def sample_images(generator: nn.Module, g_state: TrainState, key: jax.Array, n: int, z_dim: int) -> jax.Array:
    """n generator samples in normalized-input space (train-mode BN, as used for distillation)."""
    z = jax.random.normal(key, (n, z_dim), jnp.float32)
    x, _ = forward(generator, g_state, z, train=True)
    return x
