"""Tests for abd_jax.models: shapes, parameter counts, BN modes, naming and conv order."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors as flax_errors
from flax import traverse_util

from abd_jax.models import (
    MODEL_NAMES,
    Generator,
    WideResNet,
    conv_kernel_paths,
    count_params,
    get_model,
    init_model,
)

# XLA:CPU compiles threefry sampling slowly (~0.7 s per distinct kernel shape); the RngBitGenerator
# key compiles quickly and is plenty for tests.
KEY = jax.random.key(0, impl="unsafe_rbg")
# Cheap enough to run for real on 2 CPU cores; the rest are checked through jax.eval_shape.
RUN_FOR_REAL = ("wrn16_1", "wrn16_2", "vgg_small")

# Stage feature shapes (without batch) at 32x32 input.
STAGE_SHAPES = {
    "wrn10_1": [(32, 32, 16), (16, 16, 32), (8, 8, 64)],
    "wrn16_1": [(32, 32, 16), (16, 16, 32), (8, 8, 64)],
    "wrn16_2": [(32, 32, 32), (16, 16, 64), (8, 8, 128)],
    "wrn40_1": [(32, 32, 16), (16, 16, 32), (8, 8, 64)],
    "wrn40_2": [(32, 32, 32), (16, 16, 64), (8, 8, 128)],
    "resnet18": [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)],
    "resnet34": [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)],
    "vgg_small": [(16, 16, 32), (8, 8, 64), (4, 4, 128)],
}


def _abstract_variables(model, image_shape=(32, 32, 3)):
    return jax.eval_shape(lambda k: init_model(model, k, image_shape), KEY)


@pytest.fixture(scope="module")
def real_variables():
    """Initialise each cheap model once per module; init dominates the runtime on CPU."""
    cache = {}

    def get(name: str, num_classes: int = 10):
        if (name, num_classes) not in cache:
            model = get_model(name, num_classes=num_classes)
            cache[name, num_classes] = (model, init_model(model, KEY, (32, 32, 3)))
        return cache[name, num_classes]

    return get


def _torch_wrn_param_count(depth: int, k: int, num_classes: int) -> int:
    """Trainable parameters of the PyTorch reference WRN (zskt/models/wresnet.py), by hand.

    Convs have no bias; each BatchNorm2d(C) has 2C parameters (running stats are buffers);
    the shortcut 1x1 conv exists when in != out; the Linear has a bias.
    """
    n = (depth - 4) // 6
    total = 3 * 16 * 9  # stem
    c_in = 16
    for c_out in (16 * k, 32 * k, 64 * k):
        for i in range(n):
            cin = c_in if i == 0 else c_out
            total += 2 * cin + cin * c_out * 9 + 2 * c_out + c_out * c_out * 9
            if cin != c_out:
                total += cin * c_out
        c_in = c_out
    return total + 2 * c_in + c_in * num_classes + num_classes


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registry_output_shapes_32(name, real_variables):
    x = jnp.zeros((2, 32, 32, 3))
    if name in RUN_FOR_REAL:
        model, variables = real_variables(name)
        logits, feats = model.apply(variables, x)
        chex.assert_tree_all_finite((logits, feats))
    else:
        model = get_model(name, num_classes=10)
        variables = _abstract_variables(model)
        logits, feats = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert set(variables) == {"params", "batch_stats"}
    chex.assert_shape(logits, (2, 10))
    assert [f.shape[1:] for f in feats] == STAGE_SHAPES[name]


@pytest.mark.parametrize("size", [16, 8])
def test_wrn_small_inputs(size, real_variables):
    # Global pooling makes the parameters size-independent: 32x32-initialised weights apply as is.
    model, variables = real_variables("wrn16_2")
    logits, feats = model.apply(variables, jnp.ones((2, size, size, 3)))
    chex.assert_shape(logits, (2, 10))
    half, quarter = size // 2, size // 4
    chex.assert_shape(
        list(feats), [(2, size, size, 32), (2, half, half, 64), (2, quarter, quarter, 128)]
    )


# PyTorch reference (zskt/models/wresnet.py, 10 classes), sum of p.numel() over parameters():
# WRN-16-1 175,066; WRN-16-2 691,674; WRN-40-1 563,930; WRN-40-2 2,243,546 (the paper's "0.2 MB",
# "0.7 MB", "2.2 MB"). CIFAR ResNet-18/34 (kuangliu layout): 11,173,962 / 21,282,122.
@pytest.mark.parametrize(
    "name,expected",
    [
        ("wrn10_1", 77_850),  # not in the reference's tables: the hand count below
        ("wrn16_1", 175_066),
        ("wrn16_2", 691_674),
        ("wrn40_1", 563_930),
        ("wrn40_2", 2_243_546),
        ("resnet18", 11_173_962),
        ("resnet34", 21_282_122),
        ("vgg_small", 308_394),
    ],
)
def test_param_counts(name, expected):
    params = _abstract_variables(get_model(name, num_classes=10))["params"]
    assert count_params(params) == expected
    if name.startswith("wrn"):
        depth, k = (int(s) for s in name[3:].split("_"))
        assert expected == _torch_wrn_param_count(depth, k, 10)


def test_vgg_gtsrb_head_is_2048_to_43():
    params = _abstract_variables(get_model("vgg_small", num_classes=43))["params"]
    assert params["fc"]["kernel"].shape == (2048, 43)


def test_bn_train_vs_eval(real_variables):
    model, variables = real_variables("wrn16_1")
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))

    (logits, feats), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert set(updates) == {"batch_stats"}
    # The final BN sees the block3 output; PyTorch momentum 0.1 == flax momentum 0.9.
    new = updates["batch_stats"]["bn"]
    f3 = np.asarray(feats[2])
    np.testing.assert_allclose(new["mean"], 0.1 * f3.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * f3.var(axis=(0, 1, 2)), rtol=1e-4)

    # Eval uses running stats: one example's output does not depend on the rest of the batch.
    eval_full, _ = model.apply(variables, x)
    eval_one, _ = model.apply(variables, x[:1])
    np.testing.assert_allclose(eval_full[:1], eval_one, rtol=1e-5, atol=1e-5)
    # Train mode normalises with batch statistics, so the same example changes.
    train_one, _ = model.apply(variables, x[:1], train=True, mutable=["batch_stats"])[0]
    assert not np.allclose(logits[:1], train_one, atol=1e-4)
    # Without mutable batch_stats, train mode must refuse rather than silently drop the update.
    with pytest.raises(flax_errors.ModifyScopeVariableError):
        model.apply(variables, x, train=True)


def test_wrn_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n"):
        jax.eval_shape(
            WideResNet(depth=17, widen_factor=1, num_classes=10).init,
            KEY,
            jnp.zeros((1, 32, 32, 3)),
        )


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        get_model("wrn99_9", num_classes=10)
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_conv_kernel_paths_wrn16_2_order(real_variables):
    _, variables = real_variables("wrn16_2")
    params = variables["params"]
    paths = conv_kernel_paths(params)
    assert len(paths) == 16  # spec 3.1: WRN-16-2 has 16 conv keys
    assert paths[0] == ("conv1", "kernel")
    assert paths[-5:] == [
        ("block3", "layer_0", "conv1", "kernel"),
        ("block3", "layer_0", "conv2", "kernel"),
        ("block3", "layer_0", "conv_shortcut", "kernel"),
        ("block3", "layer_1", "conv1", "kernel"),
        ("block3", "layer_1", "conv2", "kernel"),
    ]
    # Input channels of those five kernels (HWIO axis -2), as listed in spec 3.1.
    flat = traverse_util.flatten_dict(params)
    assert [flat[p].shape[-2] for p in paths[-5:]] == [64, 128, 64, 128, 128]
    # Creation (insertion) order is the forward order too ...
    inserted = [p for p in flat if p in set(paths)]
    assert inserted == paths
    # ... but jit/tree_map sort dict keys; the order must survive that.
    resorted = jax.jit(lambda p: p)(params)
    assert list(traverse_util.flatten_dict(resorted)) != list(flat)
    assert conv_kernel_paths(resorted) == paths


def test_conv_kernel_paths_wrn40_2_tail():
    params = _abstract_variables(get_model("wrn40_2", num_classes=10))["params"]
    paths = conv_kernel_paths(params)
    assert len(paths) == 40
    assert [p[1:3] for p in paths[-5:]] == [
        ("layer_3", "conv2"),
        ("layer_4", "conv1"),
        ("layer_4", "conv2"),
        ("layer_5", "conv1"),
        ("layer_5", "conv2"),
    ]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_only_conv_modules_are_named_conv(name):
    params = _abstract_variables(get_model(name, num_classes=10))["params"]
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        is_conv_kernel = path[-1] == "kernel" and len(leaf.shape) == 4
        if path[-1] == "kernel":
            assert ("conv" in path[-2]) == is_conv_kernel, path
        assert all("conv" not in part for part in path[:-2]), path
    assert len(conv_kernel_paths(params)) == sum(
        p[-1] == "kernel" and len(v.shape) == 4 for p, v in flat.items()
    )


def test_generator_shape_jit_and_bn():
    gen = Generator()
    z = jax.random.normal(KEY, (8, 100))
    variables = gen.init(KEY, z, train=False)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sample(variables, z):
        return gen.apply(variables, z, train=True, mutable=["batch_stats"])

    images, updates = sample(variables, z)
    images, updates = sample(variables, z + 1.0)
    chex.assert_shape(images, (8, 32, 32, 3))
    chex.assert_tree_all_finite(images)
    # The final affine BN (scale 1, bias 0 at init) standardises each channel over the batch.
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=1e-2)
    assert set(updates["batch_stats"]) == {"bn0", "bn1", "bn2", "bn3"}
    assert [p[0] for p in conv_kernel_paths(variables["params"])] == ["conv1", "conv2", "conv3"]


def test_generator_options():
    z = jnp.ones((2, 16))
    gen = Generator(z_dim=16, image_size=16, width=32, final_bn=False, out_activation="tanh")
    variables = gen.init(KEY, z, train=False)
    assert "bn3" not in variables["params"]
    images = gen.apply(variables, z, train=False)
    chex.assert_shape(images, (2, 16, 16, 3))
    assert float(jnp.max(jnp.abs(images))) <= 1.0
    with pytest.raises(ValueError, match="divisible by 4"):
        Generator(image_size=30).init(KEY, jnp.ones((1, 100)))
    with pytest.raises(ValueError, match="expected z"):
        Generator().init(KEY, jnp.ones((1, 64)))
    with pytest.raises(ValueError, match="out_activation"):
        Generator(out_activation="sigmoid").init(KEY, jnp.ones((1, 100)))


def test_vgg_dropout_train_vs_eval(real_variables):
    model, variables = real_variables("vgg_small")
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))

    def train_logits(k):
        (logits, _), _ = model.apply(
            variables, x, train=True, rngs={"dropout": k}, mutable=["batch_stats"]
        )
        return logits

    a, b = train_logits(jax.random.key(3)), train_logits(jax.random.key(4))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, train_logits(jax.random.key(3)))
    e1, _ = model.apply(variables, x)
    e2, _ = model.apply(variables, x)
    np.testing.assert_array_equal(e1, e2)


# ---- the loop-friendly convolution (abd_jax/models/conv_op.py) ----------------------------------


@pytest.mark.parametrize(
    "stride, padding, k, lhs_dil",
    [(1, ((1, 1), (1, 1)), 3, 1), (2, ((1, 1), (1, 1)), 3, 1), (2, "VALID", 1, 1), (2, "SAME", 3, 1),
     (1, ((2, 1), (1, 2)), 3, 2)],
)
def test_loop_friendly_conv_matches_lax_up_to_second_order(stride, padding, k, lhs_dil):
    from jax import lax

    from abd_jax.models.conv_op import conv_general_dilated, loop_friendly_convs

    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
    w = jax.random.normal(jax.random.key(1), (k, k, 3, 4))

    def make(conv):
        def f(x, w):
            y = conv(x, w, (stride, stride), padding, lhs_dilation=(lhs_dil, lhs_dil),
                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.sum(jnp.sin(y))

        # value, both first derivatives, and a second-order term (SR's hypergradient shape)
        def everything(x, w):
            gx = jax.grad(f)(x, w)
            return f(x, w), jax.grad(f, (0, 1))(x, w), jax.grad(lambda w_: jnp.sum(jax.grad(f)(x, w_) * gx))(w)

        return everything

    ref = make(lax.conv_general_dilated)(x, w)
    assert "custom_vjp" not in str(jax.make_jaxpr(make(conv_general_dilated))(x, w))  # off by default
    with loop_friendly_convs():
        assert "custom_vjp" in str(jax.make_jaxpr(make(conv_general_dilated))(x, w))
        ours = make(conv_general_dilated)(x, w)
    chex.assert_trees_all_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_loop_friendly_conv_in_a_fori_loop_equals_unrolled():
    """The case it exists for: input gradients of a model inside a loop (SR's trigger rounds)."""
    from abd_jax.models.conv_op import loop_friendly_convs

    model = get_model("wrn16_1", 10)
    variables = init_model(model, jax.random.key(0), (8, 8, 3))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))

    def grad_x(d):
        return jax.grad(lambda d: jnp.sum(model.apply(variables, x + d)[0] ** 2))(d)

    def unrolled(d):
        for _ in range(3):
            d = d - 0.01 * grad_x(d)
        return d

    d0 = jnp.zeros((1, 8, 8, 3))
    ref = jax.jit(unrolled)(d0)
    with loop_friendly_convs():
        looped = jax.jit(lambda d: jax.lax.fori_loop(0, 3, lambda _, d: d - 0.01 * grad_x(d), d))(d0)
    chex.assert_trees_all_close(looped, ref, rtol=1e-4, atol=1e-5)
