"""Implicit (fixed-point) hypergradients for bi-level problems, with `jax.vjp` (spec 4.1 step 4).

The problem: an inner variable delta is (approximately) a fixed point of a map Phi,
delta* = Phi(delta*, theta), e.g. Phi(d, t) = d - eta * grad_d L_in(d, t), and we want the total
derivative of an outer objective F(theta) = L_out(delta*(theta), theta). Implicit differentiation
of the fixed-point equation gives

    d delta*/d theta = (I - dPhi/d delta)^{-1} dPhi/d theta
    dF/d theta       = dL_out/d theta + (dPhi/d theta)^T (I - dPhi/d delta)^{-T} dL_out/d delta.

The inverse is replaced by K terms of its Neumann series, computed as the fixed-point iteration
(Grazzi et al. 2020, "On the iteration complexity of hypergradient computation")

    v_0 = 0,   v_{k+1} = (dPhi/d delta)^T v_k + dL_out/d delta        (k = 0 .. K-1)
    g   = dL_out/d theta + (dPhi/d theta)^T v_K,

all Jacobians taken at (delta, theta). When the spectral radius of dPhi/d delta is rho < 1 (for the
gradient-descent map: eta small enough and L_in strongly convex in delta) the error of v_K, and so
of g, shrinks like rho^K. `delta` is treated as a constant (stop_gradient): it is the inner
solver's output, not something to backpropagate through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _tree_sq_norm(tree: PyTree) -> jax.Array:
    return sum((jnp.vdot(x, x).real for x in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


def fixed_point_hypergrad(
    outer_loss: Callable[[PyTree, PyTree], jax.Array],
    fixed_point_map: Callable[[PyTree, PyTree], PyTree],
    inner_sol: PyTree,
    outer_params: PyTree,
    *,
    iterations: int = 5,
    tol: float | None = None,
    unroll: bool = True,
    return_info: bool = False,
):
    """Implicit hypergradient dF/d theta of F(theta) = outer_loss(delta*(theta), theta).

    Args:
      outer_loss: (inner, outer) -> scalar, L_out(delta, theta).
      fixed_point_map: (inner, outer) -> inner, Phi(delta, theta); delta* is its fixed point.
      inner_sol: the (approximate) inner solution delta, any pytree; not differentiated through.
      outer_params: theta, any pytree.
      iterations: K, the number of fixed-point (Neumann) iterations; static (spec: 5).
      tol: None (default) runs exactly K iterations. A float stops early once
        ||v_{k+1} - v_k|| < tol (a `lax.while_loop`, as hypertorch's `tol`; the reference's 1e-10
        never triggers in float32 with K = 5, so None reproduces it).
      unroll: with tol None, unroll the K iterations in Python (default) or use `lax.fori_loop`.
        At K = 5 both compile equally fast; on XLA:CPU the unrolled loop ran 1.6x faster (SR on
        WRN-16-1, 8x8, B = 16: 78 vs 128 ms). Use the fori_loop for large K (compile time grows
        with unrolled K: 42 s vs 14 s at K = 20).
      return_info: also return {"outer_loss", "v_norm", "v_step", "iterations"} diagnostics.

    Returns:
      The hypergradient, a pytree shaped like `outer_params`; with `return_info`, (grads, info).
    """
    inner_sol = jax.lax.stop_gradient(inner_sol)
    loss, (g_inner, g_outer) = jax.value_and_grad(outer_loss, argnums=(0, 1))(
        inner_sol, outer_params
    )
    # One linearization of Phi at (delta, theta); each iteration only applies its transpose. The
    # theta-cotangent computed inside the loop is unused there and removed by XLA.
    _, phi_vjp = jax.vjp(fixed_point_map, inner_sol, outer_params)

    def body(carry):
        k, v, _ = carry
        v_new = jax.tree.map(jnp.add, phi_vjp(v)[0], g_inner)
        return k + 1, v_new, _tree_sq_norm(jax.tree.map(jnp.subtract, v_new, v))

    init = (
        jnp.asarray(0),
        jax.tree.map(jnp.zeros_like, g_inner),
        jnp.asarray(jnp.inf, jnp.float32),
    )
    if tol is None and unroll:
        carry = init
        for _ in range(iterations):
            carry = body(carry)
        k, v, dist2 = carry
    elif tol is None:
        k, v, dist2 = jax.lax.fori_loop(0, iterations, lambda _, c: body(c), init)
    else:

        def cond(carry):
            k, _, dist2 = carry
            return (k < iterations) & (dist2 >= tol * tol)

        k, v, dist2 = jax.lax.while_loop(cond, body, init)
    grads = jax.tree.map(jnp.add, g_outer, phi_vjp(v)[1])
    if not return_info:
        return grads
    # v_step = ||v_K - v_{K-1}||: how far the Neumann series still was from converging.
    info = {
        "outer_loss": loss,
        "v_norm": jnp.sqrt(_tree_sq_norm(v)),
        "v_step": jnp.sqrt(dist2),
        "iterations": k,
    }
    return grads, info
