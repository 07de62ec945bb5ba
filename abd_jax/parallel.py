"""Data parallelism over a 1-D device mesh: batch sharded, parameters replicated.

The steps stay the single-device code. `jit_data_parallel` compiles them with shardings (batch
arguments split over the mesh axis "data", everything else replicated) and XLA's SPMD partitioner
(GSPMD) splits the work: every reduction over the batch (the loss mean, hence the gradient, and
BatchNorm's batch mean and variance) becomes a per-device partial reduction plus an all-reduce, so
it is a reduction over the *global* batch. Nothing here averages gradients by hand (no `pmean`):
the values are those of the single-device step up to float summation order, on 1 device or many,
on one host or several (tests/test_parallel.py).

Why not `shard_map`: inside it the code sees per-device shards, so BatchNorm would normalize each
device's shard by its own statistics (a different model than the single-device one) unless every
BN layer is rewritten with collectives, and the gradient of replicated parameters needs care (a
`pmean` of `grad` over replicated parameters came out 8x too large in a quick try). Under `jit`
with shardings the code keeps its global view.

Why `AxisType.Auto`: `jax.make_mesh` defaults to Explicit axes in jax 0.10, where a plain gradient
over a batch sharded on the axis is refused ("Contracting dimensions are sharded"); Auto axes are
GSPMD's propagation, which the existing steps need unchanged.

Data-free steps draw their batch inside the step (ZSKT's noise z): with only replicated inputs GSPMD
would compute the whole batch on every device. `constrain_batch` marks such an array batch-sharded
while a mesh is in context (`jax.set_mesh`: `jit_data_parallel` sets its mesh around each call;
`in_mesh` / `data_parallel(mesh)` do it for steps that compile their own pieces) and is the
identity otherwise, so the single-device path is unchanged. Using jax's own mesh context (not a private
flag) matters: it is part of jit's cache key, so a function traced once without a mesh is traced
again under one instead of silently reusing the unconstrained program.

Multi-host: call `jax.distributed.initialize()` before anything else touches JAX; `jax.devices()`
is then global and `data_mesh()` spans every host. Every process runs the same program on the same
*global* batch (same data order: same seed); `put_batch` gives each device its slice of it.

Typical use (the single-device path is `mesh = None`):

    mesh = data_mesh() if n_devices > 1 else None
    step = jit_data_parallel(make_supervised_step(...), mesh, batch_argnums=(1, 2))
    state = put_replicated(state, mesh) if mesh else state
    for x, y in batches:
        xb, yb = (put_batch(x, mesh), put_batch(y, mesh)) if mesh else (x, y)
        state, metrics = step(state, xb, yb)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any
AXIS = "data"


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis "data" (Auto axis type) over all devices, or the first `num_devices`.

    Multi-host: after `jax.distributed.initialize()` `jax.devices()` lists every host's devices,
    so the default mesh spans all hosts; a subset is refused there (some process would hold none).
    """
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be in [1, {len(devices)}] (the devices JAX sees: "
                             f"{devices[0].platform} x {len(devices)}), got {num_devices}")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError(f"with {jax.process_count()} processes the mesh must use all {len(devices)} "
                             f"devices, got num_devices={num_devices}")
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, keys)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Dimension `axis` (the batch) split over the mesh axis "data", the rest whole."""
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), AXIS))


def _is_local(mesh: Mesh) -> bool:
    return jax.process_count() == 1 or not mesh.is_multi_process


def _global_from_host(leaf: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds in full (multi-host `device_put`)."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = _global_from_host(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _put(tree: PyTree, sharding: NamedSharding) -> PyTree:
    if _is_local(sharding.mesh):
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda leaf: _global_from_host(leaf, sharding), tree)


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    """`tree` replicated on every device of `mesh` (multi-host: every process passes the same tree)."""
    return _put(tree, replicated(mesh))


def put_batch(x: PyTree, mesh: Mesh) -> PyTree:
    """A global batch (array, or pytree of arrays with the same leading batch dimension) split
    along dimension 0 over `mesh`.

    Multi-host: every process passes the same full global batch and each device gets its slice
    (`jax.make_array_from_callback`); no data moves between hosts.
    """
    n = mesh.size
    for leaf in jax.tree.leaves(x):
        b = np.shape(leaf)[0] if np.ndim(leaf) else None
        if b is None or b % n:
            raise ValueError(f"the batch size ({b}) must be divisible by the number of devices in the mesh "
                             f"({n}); pick a batch size that is a multiple of {n}, or use "
                             f"data_mesh(num_devices=...) with a divisor of the batch size")
    return _put(x, batch_sharded(mesh))


@contextlib.contextmanager
def data_parallel(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """`jax.set_mesh(mesh)` as a block (None: no-op): `constrain_batch` in code traced inside it
    splits the batch over the mesh.

    `jit_data_parallel` does this itself; `in_mesh` wraps a step that compiles its own pieces
    (ZSKT's fuse="host": `make_pseudo_batch` jits its halves) in it. The mesh in context is part
    of jax's compilation cache key, so one step object can be called both inside and outside the
    block (each traces its own program).
    """
    if mesh is None:
        yield None
        return
    with jax.set_mesh(mesh):
        yield mesh


def constrain_batch(x: PyTree, axis: int = 0) -> PyTree:
    """Inside a traced step: marks `x` (an array or pytree) as split along `axis` over the mesh
    axis "data" of the mesh in context, so GSPMD partitions the work that produces and consumes it.
    The identity without such a mesh (no `jax.set_mesh`, or one without a "data" axis, or one
    device). The values do not change; a batch that does not divide evenly is legal here (XLA
    pads), only slower.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names or mesh.shape[AXIS] == 1:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*([None] * axis), AXIS))


def _cpu_mesh(mesh: Mesh) -> bool:
    """Several CPU devices: XLA:CPU's in-process collectives deadlock when too many executions are
    queued (jax 0.10.2, 8 fake devices on 2 cores: 30 queued steps ran, 60 aborted with
    "Expected 8 threads to join the rendezvous"), so steps over such a mesh wait for their result."""
    return mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


class DataParallelStep:
    """`step_fn` jitted with batch arguments split over the mesh and the others replicated.

    Calls run under `jax.set_mesh(mesh)`, so `constrain_batch` inside the step sees the mesh. One
    jit per number of positional arguments. Over several CPU devices each call waits for its result
    (`_cpu_mesh`); elsewhere calls are asynchronous as usual. `lower(*args)` lowers the same way
    (to inspect the compiled program). Keyword arguments are not supported: pass everything
    positionally. Do not wrap it in another `jax.jit` (`jax.set_mesh` is refused under a trace).
    """

    def __init__(self, step_fn: Callable, mesh: Mesh, batch_argnums: Sequence[int], donate_argnums: Sequence[int],
                 out_shardings: Any):
        self.step_fn, self.mesh = step_fn, mesh
        self.batch_argnums, self.donate_argnums = tuple(batch_argnums), tuple(donate_argnums)
        self.out_shardings = replicated(mesh) if out_shardings is None else out_shardings
        self._jitted: dict[int, Callable] = {}
        self._wait = _cpu_mesh(mesh)

    def jitted(self, nargs: int) -> Callable:
        if nargs not in self._jitted:
            bad = [i for i in self.batch_argnums if not 0 <= i < nargs]
            if bad:
                raise ValueError(f"batch_argnums {bad} out of range for a call with {nargs} positional arguments")
            in_shardings = tuple(batch_sharded(self.mesh) if i in self.batch_argnums else replicated(self.mesh)
                                 for i in range(nargs))
            self._jitted[nargs] = jax.jit(self.step_fn, in_shardings=in_shardings,
                                          out_shardings=self.out_shardings, donate_argnums=self.donate_argnums)
        return self._jitted[nargs]

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            out = self.jitted(len(args))(*args)
        return jax.block_until_ready(out) if self._wait else out

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(len(args)).lower(*args)


def in_mesh(step_fn: Callable, mesh: Mesh | None) -> Callable:
    """For a step that compiles its own pieces (ZSKT's fuse="host", the SR phase's default): calls
    it inside `data_parallel(mesh)`, and over several CPU devices waits for its result (see
    `_cpu_mesh`). mesh None: `step_fn` itself. Place its inputs with `put_replicated`."""
    if mesh is None:
        return step_fn
    wait = _cpu_mesh(mesh)

    @functools.wraps(step_fn)
    def call(*args, **kwargs):
        with data_parallel(mesh):
            out = step_fn(*args, **kwargs)
        return jax.block_until_ready(out) if wait else out

    return call


def jit_data_parallel(step_fn: Callable, mesh: Mesh | None, *, batch_argnums: tuple[int, ...],
                      donate_argnums: tuple[int, ...] = (0,), out_shardings: Any = None) -> Callable:
    """Compiles `step_fn` for data parallelism over `mesh`.

    mesh None: exactly `jax.jit(step_fn, donate_argnums=donate_argnums)` (the single-device path).
    Otherwise the positional arguments in `batch_argnums` (each an array or pytree of arrays with
    the batch first) are split over the mesh, every other argument (state, teacher variables) is
    replicated, and the outputs are replicated (`out_shardings`: any sharding or pytree prefix of
    shardings to override). On one host, arguments may also be host arrays or arrays on one device
    (they are moved on each call; a batch must divide by the mesh size); place them once with
    `put_replicated` / `put_batch` instead, and on several hosts always. The returned state is
    already replicated: feeding it back moves nothing.
    """
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=donate_argnums)
    return DataParallelStep(step_fn, mesh, batch_argnums, donate_argnums, out_shardings)
