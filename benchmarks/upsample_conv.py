"""Time the generator's "upsample x2 + 3x3 conv" fused (models/upsample_conv.py) against the two
ops in turn, per layer and for the whole ZSKT (and CMI) generator, on the current backend.

    python -m benchmarks.upsample_conv [--size 32] [--batch 128] [--repeats 10] [--json]
        [--generators zskt cmi] [--no-layers]

Layers: the ZSKT generator's two (width 128: 128 -> 128 channels at S/4 -> S/2 pixels, 128 -> 64
at S/2 -> S). Per case: forward, and forward + the gradients of input and kernel (`jax.vjp`),
median ms; the whole generator in train mode: forward, and forward + parameter gradients. The
maximum relative difference between the two forms is printed (rounding only). Used for
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from abd_jax.models import Generator
from abd_jax.models.cmi_generator import CMIGenerator
from abd_jax.models.generator import _upsample2x
from abd_jax.models.upsample_conv import upsample2x_conv3x3
from benchmarks.conv_grads import median_ms


def separate(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(_upsample2x(x), w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def rel_diff(a: jax.Array, b: jax.Array) -> float:
    return float(f"{float(jnp.abs(a - b).max() / jnp.abs(b).max()):.1e}")


def layer_rows(size: int, batch: int, repeats: int) -> list[dict]:
    rows = []
    for h, c, o in ((size // 4, 128, 128), (size // 2, 128, 64)):
        kx, kw, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (batch, h, h, c))
        w = jax.random.normal(kw, (3, 3, c, o)) * 0.05
        g = jax.random.normal(kg, (batch, 2 * h, 2 * h, o))
        row = {"case": f"layer {c}->{o} at {h}->{2 * h} px"}
        for name, fn in (("separate", separate), ("fused", upsample2x_conv3x3)):
            row[f"{name}_forward_ms"] = median_ms(jax.jit(fn), x, w, repeats=repeats)
            vjp = jax.jit(lambda x, w, g, fn=fn: jax.vjp(fn, x, w)[1](g))
            row[f"{name}_vjp_ms"] = median_ms(vjp, x, w, g, repeats=repeats)
        row["rel_diff"] = rel_diff(jax.jit(upsample2x_conv3x3)(x, w), jax.jit(separate)(x, w))
        rows.append(row)
    return rows


GENERATORS = {"zskt": (Generator, 100), "cmi": (CMIGenerator, 256)}  # module, z_dim (each one's default)


def generator_row(size: int, batch: int, repeats: int, kind: str = "zskt") -> dict:
    module, z_dim = GENERATORS[kind]
    z = jax.random.normal(jax.random.key(1), (batch, z_dim))
    row = {"case": f"{kind.upper()} generator at {size}x{size}, batch {batch}, train mode"}
    outs = {}
    for name, fused in (("separate", False), ("fused", True)):
        gen = module(z_dim=z_dim, image_size=size, fused_upsample=fused)
        variables = gen.init(jax.random.key(0), z, train=False)

        def images(params, z, gen=gen, variables=variables):
            return gen.apply({**variables, "params": params}, z, train=True, mutable=["batch_stats"])[0]

        grads = jax.jit(jax.grad(lambda p, z, images=images: jnp.sum(jnp.sin(images(p, z)))))
        row[f"{name}_forward_ms"] = median_ms(jax.jit(images), variables["params"], z, repeats=repeats)
        row[f"{name}_fwd_bwd_ms"] = median_ms(grads, variables["params"], z, repeats=repeats)
        outs[name] = jax.jit(images)(variables["params"], z)
    row["rel_diff"] = rel_diff(outs["fused"], outs["separate"])
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--generators", nargs="+", default=["zskt"], choices=sorted(GENERATORS),
                    help="whole generators to time (cmi: CMI's, at its own z_dim and width 128)")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer rows")
    args = ap.parse_args(argv)
    rows = [] if args.no_layers else layer_rows(args.size, args.batch, args.repeats)
    rows += [generator_row(args.size, args.batch, args.repeats, kind) for kind in args.generators]
    for row in rows:
        row["device"] = jax.devices()[0].device_kind
        print(json.dumps(row) if args.json else "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    main()
