"""Time one 3x3 convolution's forward pass, input gradient and kernel gradient, and three
rewrites of the kernel gradient, on the current backend.

    python -m benchmarks.conv_grads [--shape 128 32 32 32] [--repeats 20] [--json]

`--shape N H C O`: batch, spatial size (H = W), input and output channels; NHWC / HWIO, SAME
padding, stride 1. The rewrites of the kernel gradient dW[i, j, c, o] = sum_{n,h,w}
x_pad[n, h+i, w+j, c] * g[n, h, w, o]:
- `dw_slices`: 9 shifted slices of the padded input, each a [C, NHW] x [NHW, O] matrix product;
- `dw_patches`: XLA's patches op (`conv_general_dilated_patches`) then one matrix product;
- `dw_as_forward_conv`: a VALID forward convolution of the transposed input [C, H+2, W+2, N]
  with the output gradient as a [H, W, N, O] kernel.
Each is checked against `jax.vjp`'s kernel gradient (max relative error printed). And what the
kernel gradient's operand layout costs on its own: `bn_relu_ms` writes relu(a x + b) (a BN output)
in x's layout, `bn_relu_to_cnhw_ms` the same transposed to [C, H, W, N], the form XLA:CPU's
kernel-gradient convolution reads its activation in. Used for docs/PERFORMANCE.md ("What limits ...").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

DN = ("NHWC", "HWIO", "NHWC")


def conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def dw_slices(x: jax.Array, g: jax.Array) -> jax.Array:
    n, h, wd, c = x.shape
    o = g.shape[-1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    g2 = g.reshape(-1, o)
    taps = [xp[:, i:i + h, j:j + wd, :].reshape(-1, c).T @ g2 for i in range(3) for j in range(3)]
    return jnp.stack(taps).reshape(3, 3, c, o)


def dw_patches(x: jax.Array, g: jax.Array) -> jax.Array:
    c, o = x.shape[-1], g.shape[-1]
    p = lax.conv_general_dilated_patches(x, (3, 3), (1, 1), "SAME", dimension_numbers=DN)  # [..., C*9], C major
    return jnp.einsum("nhwk,nhwo->ko", p, g).reshape(c, 3, 3, o).transpose(1, 2, 0, 3)


def dw_as_forward_conv(x: jax.Array, g: jax.Array) -> jax.Array:
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).transpose(3, 1, 2, 0)  # C, H+2, W+2, N
    out = lax.conv_general_dilated(xp, g.transpose(1, 2, 0, 3), (1, 1), "VALID", dimension_numbers=DN)
    return out.transpose(1, 2, 0, 3)  # [3, 3, C, O]


def median_ms(fn: Callable, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1000 * (time.perf_counter() - t0))
    return round(statistics.median(times), 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[128, 32, 32, 32], metavar=("N", "H", "C", "O"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    n, h, c, o = args.shape
    x = jax.random.normal(jax.random.key(0), (n, h, h, c))
    w = jax.random.normal(jax.random.key(1), (3, 3, c, o))
    g = jax.random.normal(jax.random.key(2), (n, h, h, o))
    dx = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1])
    ref = dw(x, w, g)
    row = {"shape": args.shape, "gflop": round(2 * n * h * h * c * o * 9 / 1e9, 3),
           "forward_ms": median_ms(jax.jit(conv), x, w, repeats=args.repeats),
           "input_grad_ms": median_ms(dx, x, w, g, repeats=args.repeats),
           "kernel_grad_ms": median_ms(dw, x, w, g, repeats=args.repeats)}
    for name, fn in (("dw_slices", dw_slices), ("dw_patches", dw_patches), ("dw_as_forward_conv", dw_as_forward_conv)):
        jitted = jax.jit(fn)
        err = float(jnp.abs(jitted(x, g) - ref).max() / jnp.abs(ref).max())
        row[f"{name}_ms"] = median_ms(jitted, x, g, repeats=args.repeats)
        row[f"{name}_rel_err"] = float(f"{err:.1e}")
    scale, shift = jnp.linspace(0.5, 1.5, c), jnp.linspace(-0.1, 0.1, c)
    bn_relu = lambda x: jax.nn.relu(x * scale + shift)  # noqa: E731
    row["bn_relu_ms"] = median_ms(jax.jit(bn_relu), x, repeats=args.repeats)
    row["bn_relu_to_cnhw_ms"] = median_ms(jax.jit(lambda x: bn_relu(x).transpose(3, 1, 2, 0)), x, repeats=args.repeats)
    row["device"] = jax.devices()[0].device_kind
    print(json.dumps(row) if args.json else "\n".join(f"{k:28s} {v}" for k, v in row.items()), flush=True)
    return row


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    main()
