"""Train-state pytrees: data only, no functions inside.

Keeping `apply_fn`/`tx` out of the state lets it round-trip through Orbax and `jax.eval_shape`
unchanged, and lets the same state be used under vmap/shard_map.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any


class TrainState(struct.PyTreeNode):
    """A supervised or distilled network: its variables, its optimizer state and its RNG.

    Attributes:
      params: model parameters.
      batch_stats: BatchNorm running statistics (empty dict for models without BN).
      opt_state: optax state.
      step: int32 scalar, number of updates taken.
      key: PRNG key; each step derives its randomness by `fold_in(key, step)`.
    """

    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    step: jax.Array
    key: jax.Array

    @property
    def variables(self) -> dict[str, PyTree]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(variables: dict[str, PyTree], tx: Any, key: jax.Array) -> TrainState:
    """Builds a TrainState from `model.init` output and an optax transformation."""
    params = variables["params"]
    return TrainState(
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        key=key,
    )
