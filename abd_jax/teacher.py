"""Supervised (poisoned or clean) teacher training: a pure step factory and a host-side loop.

The step does augmentation, normalization, forward, backward and the optimizer update in one jitted
function; the loop only feeds uint8 batches, evaluates Acc/ASR and keeps the best clean-accuracy
weights, as the teachers of spec 8 were selected (`best_clean_acc.pth`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from abd_jax.augment import normalize, random_crop_flip
from abd_jax.losses import cross_entropy
from abd_jax.parallel import jit_data_parallel, put_batch, put_replicated
from abd_jax.progress import progress_bar
from abd_jax.resume import CheckpointPolicy, closing, stop_if_preempted
from abd_jax.state import TrainState

Metrics = dict[str, jax.Array]
StepFn = Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]


def make_supervised_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    augment: bool = True,
    flip: bool = True,
    pad: int = 4,
) -> StepFn:
    """Returns `step(state, x_uint8 [B,H,W,C], y [B]) -> (state, metrics)`; not jitted.

    Cross-entropy on (augmented) images; BatchNorm in train mode with batch statistics.
    """

    def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(state.key, state.step)
        k_aug, k_drop = jax.random.split(key)
        xb = random_crop_flip(k_aug, x, pad=pad, flip=flip) if augment else x
        xb = normalize(xb, mean, std)

        def loss_fn(params):
            (logits, _), updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                xb,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": k_drop},
            )
            loss = jnp.mean(cross_entropy(logits, y))
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        upd, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            params=optax.apply_updates(state.params, upd),
            batch_stats=updates.get("batch_stats", state.batch_stats),
            opt_state=opt_state,
            step=state.step + 1,
        )
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return new_state, {"loss": loss, "train_acc": acc}

    return step


def make_predict_fn(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Returns jitted `predict(variables, x_pixels) -> logits` in eval mode (running BN stats)."""

    @jax.jit
    def predict(variables: dict[str, Any], x: jax.Array) -> jax.Array:
        logits, _ = model.apply(variables, normalize(x, mean, std), train=False)
        return logits

    return predict


def epoch_batches(rng: np.random.Generator, n: int, batch_size: int) -> list[np.ndarray]:
    """Shuffled index batches of exactly `batch_size` (drop_last keeps one compiled shape)."""
    if n < batch_size:
        raise ValueError(
            f"batch size {batch_size} exceeds the {n} training examples; lower the batch size"
        )
    perm = rng.permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def fit(
    step_fn: StepFn,
    state: TrainState,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    evaluate: Callable[[TrainState], dict[str, float]] | None = None,
    eval_every: int = 1,
    select_key: str | None = "acc",
    desc: str = "teacher",
    on_epoch_end: Callable[[int, TrainState, dict[str, float]], None] | None = None,
    const: Any = None,
    checkpoint: CheckpointPolicy | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, TrainState, list[dict[str, float]]]:
    """Runs `epochs` of jitted steps over host arrays with a progress bar.

    Args:
      step_fn: a step from `make_supervised_step` (jitted here, once).
      evaluate: returns {"acc", "asr", ...} in percent for a state; called every `eval_every`
        epochs and after the last one.
      select_key: keep the state with the best value of this metric (spec 8 uses the best clean
        test accuracy); None keeps the last state.
      const: if given, the step is called as `step_fn(state, const, x, y)`; for what the step
        reads but never changes (a teacher's variables), passed rather than closed over.
      checkpoint: where this run (named `desc`) checkpoints, counted in steps (batches); with
        `checkpoint.resume` it continues mid-epoch from its latest checkpoint, replaying the
        shuffles of the epochs before so the batches are the same (abd_jax.resume).
      mesh: data parallelism over this device mesh (abd_jax.parallel): each batch split over the
        devices, the state replicated; the batch size must divide by the number of devices.

    Returns:
      (last state, selected state, history of per-evaluation metrics).
    """
    jitted = jit_data_parallel(step_fn, mesh, batch_argnums=(1, 2) if const is None else (2, 3))
    rng = np.random.default_rng(seed)
    n_batches = len(x_train) // batch_size
    total = epochs * n_batches
    history: list[dict[str, float]] = []
    best, best_val = state, -np.inf
    shown: dict[str, float] = {}
    losses: list = []  # this epoch's losses; device scalars, read back once per epoch
    start = 0
    phase = checkpoint.open(desc, 0, total) if checkpoint is not None else None
    restored = phase.restore({"state": state, "best": state}) if phase is not None else None
    if restored is not None:
        trees, start, history, _, meta = restored
        state, best = trees["state"], trees["best"]
        best_val, shown, losses = meta["best_val"], meta["shown"], meta["epoch_losses"]
    state = jax.tree.map(jnp.copy, state)  # donation needs unaliased leaves
    if mesh is not None:
        state = put_replicated(state, mesh)
        const = None if const is None else put_replicated(const, mesh)
    place = (lambda a: jnp.asarray(a)) if mesh is None else (lambda a: put_batch(a, mesh))

    def float32s(values: list) -> list[float]:  # exact: float32 -> Python float -> float32
        return [float(v) for v in np.asarray(jax.device_get(values), np.float32)]

    def save(step: int, wait: bool = False) -> None:  # losses checked first: the last checkpoint stays good
        _check_losses(float32s(losses), desc, (step - 1) // n_batches)
        phase.save(step, {"state": state, "best": best}, history, wait=wait,
                   extra={"best_val": float(best_val), "shown": shown, "epoch_losses": float32s(losses)})

    with progress_bar(total=total, desc=desc) as bar, closing(phase):
        bar.update(start)
        for epoch in range(epochs):
            batches = epoch_batches(rng, len(x_train), batch_size)  # drawn for every epoch: same rng stream
            if (epoch + 1) * n_batches <= start:
                continue
            for b, idx in enumerate(batches):
                step = epoch * n_batches + b
                if step < start:
                    continue
                xb, yb = place(x_train[idx]), place(y_train[idx])
                state, m = jitted(state, xb, yb) if const is None else jitted(state, const, xb, yb)
                losses.append(m["loss"])
                bar.update(1)
                if b + 1 < n_batches:  # the epoch's end is handled below, after its evaluation
                    if phase is not None and phase.due(step + 1):
                        save(step + 1)
                    stop_if_preempted(phase, step + 1, lambda: save(step + 1, wait=True))  # noqa: B023
            loss = float(np.mean(np.asarray(float32s(losses), np.float32)))
            losses = []
            _check_losses([loss], desc, epoch)
            record: dict[str, float] = {"epoch": epoch + 1, "loss": loss}
            if evaluate is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
                record.update(evaluate(state))
                if select_key is not None and record[select_key] > best_val:
                    best, best_val = jax.tree.map(jnp.copy, state), record[select_key]
                history.append(record)
            shown.update({k: v for k, v in record.items() if k != "epoch"})  # keep the last Acc/ASR
            bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, state, record)
            end = (epoch + 1) * n_batches
            if phase is not None and phase.due(end):
                save(end)
            stop_if_preempted(phase, end, lambda: save(end, wait=True))  # noqa: B023
    if select_key is None:
        best = state
    return state, best, history


def _check_losses(losses: list[float], desc: str, epoch: int) -> None:
    """Stops on a NaN/Inf loss before anything is saved, so the last checkpoint stays good."""
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(
            f"{desc}: loss became NaN/Inf in epoch {epoch + 1}; lower the learning rate "
            "(the last good checkpoint in the work directory is intact)"
        )
