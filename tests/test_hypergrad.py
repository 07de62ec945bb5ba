"""Fixed-point hypergradient: equals the closed-form implicit gradient on a quadratic bi-level
problem, converges geometrically in K, matches differentiating through a long inner solve on a
non-quadratic problem, and compiles once.

Quadratic problem (d in R^n inner, t in R^m outer, A SPD, B with orthonormal rows):
  L_in(d, t)  = 0.5 d^T A d - d^T B t,        Phi(d, t) = d - eta (A d - B t)
  L_out(d, t) = 0.5 ||d - c||^2 + 0.5 ||t||^2
  d*(t) = A^{-1} B t,   dF/dt = B^T A^{-1} (d* - c) + t.
With K iterations v_K = sum_{k<K} (I - eta A)^k (d* - c), so the error of g is
B^T (I - eta A)^K A^{-1} (d* - c): its norm falls at least by rho = max|1 - eta lambda(A)| per
iteration (B^T is an isometry here, so the decrease is monotone).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax.hypergrad import fixed_point_hypergrad

N, M, ETA = 6, 8, 0.1


def quadratic_problem(seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(N, N)))
    eig = np.linspace(1.0, 4.0, N)  # eta * lambda in [0.1, 0.4]: rho = 0.9
    a = (q * eig) @ q.T
    b = np.linalg.qr(rng.normal(size=(M, N)))[0].T  # [N, M], orthonormal rows
    c = rng.normal(size=N)
    t = {"u": rng.normal(size=M - 3), "w": rng.normal(size=3)}  # a pytree outer variable
    return [jnp.asarray(v, jnp.float32) for v in (a, b, c)] + [
        jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t)
    ]


def flat(t):
    return jnp.concatenate([t["u"], t["w"]])


def make_fns(a, b, c):
    def inner_loss(d, t):
        return 0.5 * d @ a @ d - d @ (b @ flat(t))

    def phi(d, t):
        return d - ETA * jax.grad(inner_loss)(d, t)

    def outer_loss(d, t):
        return 0.5 * jnp.sum((d - c) ** 2) + 0.5 * jnp.sum(flat(t) ** 2)

    return phi, outer_loss


def closed_form(a, b, c, t):
    tf = np.asarray(flat(t), np.float64)
    a, b, c = (np.asarray(v, np.float64) for v in (a, b, c))
    d_star = np.linalg.solve(a, b @ tf)
    return d_star, b.T @ np.linalg.solve(a, d_star - c) + tf


def test_matches_closed_form_and_converges_geometrically():
    a, b, c, t = quadratic_problem()
    phi, outer_loss = make_fns(a, b, c)
    d_star, exact = closed_form(a, b, c, t)
    d_star = jnp.asarray(d_star, jnp.float32)
    errors = []
    for k in range(0, 41, 4):
        g = fixed_point_hypergrad(outer_loss, phi, d_star, t, iterations=k)
        chex.assert_trees_all_equal_structs(g, t)
        errors.append(np.linalg.norm(np.asarray(flat(g), np.float64) - exact))
    rho = 0.9
    for k in range(1, len(errors)):
        assert errors[k] < errors[k - 1]
        assert errors[k] <= rho**4 * errors[k - 1] * (1 + 1e-3) + 1e-5  # geometric, rate <= rho
    big = fixed_point_hypergrad(outer_loss, phi, d_star, t, iterations=300, unroll=False)
    np.testing.assert_allclose(flat(big), exact, rtol=1e-4, atol=1e-5)


def test_unroll_fori_and_tol_agree():
    a, b, c, t = quadratic_problem(1)
    phi, outer_loss = make_fns(a, b, c)
    d_star = jnp.asarray(closed_form(a, b, c, t)[0], jnp.float32)
    g1 = fixed_point_hypergrad(outer_loss, phi, d_star, t, iterations=7)
    g2 = fixed_point_hypergrad(outer_loss, phi, d_star, t, iterations=7, unroll=False)
    g3, info = fixed_point_hypergrad(
        outer_loss, phi, d_star, t, iterations=7, tol=0.0, return_info=True
    )
    chex.assert_trees_all_close(g1, g2, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(g1, g3, rtol=1e-6, atol=1e-6)
    assert int(info["iterations"]) == 7
    # A loose tol stops early; the reference's 1e-10 would not.
    _, info = fixed_point_hypergrad(
        outer_loss, phi, d_star, t, iterations=50, tol=1e-2, return_info=True
    )
    assert 1 <= int(info["iterations"]) < 50 and float(info["v_step"]) < 1e-2


def test_nonquadratic_matches_differentiating_the_inner_solve():
    """d*(t) by 3000 GD steps, then jax.grad through them, vs the implicit gradient at d*."""
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    c = jnp.asarray(rng.normal(size=5), jnp.float32)

    def inner_loss(d, t):  # strongly convex in d: 0.5||d||^2 + convex log-cosh - linear term
        return 0.5 * jnp.sum(d**2) + jnp.sum(jnp.log(jnp.cosh(d))) - d @ jnp.tanh(w @ t["p"])

    def phi(d, t):
        return d - 0.3 * jax.grad(inner_loss)(d, t)

    def outer_loss(d, t):
        return jnp.sum(jnp.sin(d) * c) + 0.1 * jnp.sum(t["p"] ** 2)

    def solve(t):
        return jax.lax.fori_loop(0, 3000, lambda _, d: phi(d, t), jnp.zeros(5))

    t = {"p": jnp.asarray(rng.normal(size=4), jnp.float32)}
    unrolled = jax.grad(lambda t: outer_loss(solve(t), t))(t)
    implicit = jax.jit(lambda d, t: fixed_point_hypergrad(outer_loss, phi, d, t, iterations=60))(
        solve(t), t
    )
    chex.assert_trees_all_close(implicit, unrolled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("unroll", [True, False])
def test_jits_once(unroll):
    a, b, c, t = quadratic_problem()
    phi, outer_loss = make_fns(a, b, c)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def hg(d, t):
        return fixed_point_hypergrad(
            outer_loss, phi, d, t, iterations=5, unroll=unroll, return_info=True
        )

    for i in range(3):
        g, info = hg(jnp.full((N,), float(i)), t)
        chex.assert_tree_all_finite((g, info))
    chex.clear_trace_counter()
