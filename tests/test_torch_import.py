"""Import of the paper's PyTorch WideResNet teachers (abd_jax/torch_import.py).

Without PyTorch: the reference key set and shapes, an exact round trip through a state_dict built
from our own variables, the errors for missing / unexpected / misshaped keys, `.npz` and
`.safetensors` reading, and the CLI writing a teacher that `load_teacher` reads back.
With PyTorch (skipped otherwise): a WideResNet written here in PyTorch with the reference's
structure, saved with torch.save, imported, and compared logit by logit.
"""

from __future__ import annotations

import hashlib
import re
import sys

import chex
import jax
import numpy as np
import pytest
from flax import traverse_util

from abd_jax import torch_import as ti
from abd_jax.checkpoint import load_teacher
from abd_jax.models import get_model, init_model

SMALL = (8, 8, 3)  # parameter shapes do not depend on the image size (global average pool)


def reference_state_dict_shapes(depth: int, widen: int, classes: int) -> dict[str, tuple]:
    """Keys and shapes of the reference ZSKT WideResNet's state_dict, spelled out independently
    of the importer: pre-activation blocks, a 1x1 convShortcut only where in != out."""
    n = (depth - 4) // 6
    ch = [16, 16 * widen, 32 * widen, 64 * widen]
    shapes: dict[str, tuple] = {"conv1.weight": (16, 3, 3, 3)}

    def bn(prefix: str, c: int) -> None:
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{s}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    for b in (1, 2, 3):
        for i in range(n):
            cin, cout = (ch[b - 1] if i == 0 else ch[b]), ch[b]
            p = f"block{b}.layer.{i}"
            bn(f"{p}.bn1", cin)
            shapes[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            bn(f"{p}.bn2", cout)
            shapes[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            if cin != cout:
                shapes[f"{p}.convShortcut.weight"] = (cout, cin, 1, 1)
    bn("bn1", ch[3])
    shapes["fc.weight"] = (classes, ch[3])
    shapes["fc.bias"] = (classes,)
    return shapes


def _flax_path(key: str) -> tuple[str, ...]:
    """The test's own reverse naming: PyTorch key -> (collection, *flax path)."""
    module, leaf = key.rsplit(".", 1)
    module = re.sub(r"layer\.(\d+)", r"layer_\1", module).replace("convShortcut", "conv_shortcut")
    parts = ["bn"] if module == "bn1" else module.split(".")
    if leaf in ("running_mean", "running_var"):
        return ("batch_stats", *parts, leaf.removeprefix("running_"))
    is_bn = parts[-1].startswith("bn")
    name = {"weight": "scale" if is_bn else "kernel", "bias": "bias"}[leaf]
    return ("params", *parts, name)


def random_variables(name: str, classes: int, seed: int = 0) -> dict:
    """Our variables with every leaf random (BN statistics too, variances positive).

    Drawn with numpy on the shapes from `jax.eval_shape`: no XLA compilation, so the tests
    without PyTorch stay fast.
    """
    model = get_model(name, classes)
    abstract = jax.eval_shape(lambda: init_model(model, jax.random.key(0), SMALL))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(abstract)
    for k, x in flat.items():
        if k[-1] == "var":
            flat[k] = rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
        else:
            flat[k] = rng.normal(0.0, 0.5, x.shape).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def to_torch_state_dict(variables: dict, depth: int, widen: int, classes: int) -> dict:
    """What torch.save(model.state_dict()) would hold for these weights (numpy, PyTorch layout)."""
    flat = traverse_util.flatten_dict(variables)
    sd = {}
    for key, shape in reference_state_dict_shapes(depth, widen, classes).items():
        if key.endswith("num_batches_tracked"):
            sd[key] = np.array(1234, np.int64)
            continue
        x = flat[_flax_path(key)]
        if x.ndim == 4:
            x = np.transpose(x, (3, 2, 0, 1))  # HWIO -> OIHW
        elif x.ndim == 2:
            x = x.T
        assert x.shape == shape, key
        sd[key] = np.ascontiguousarray(x)
    return sd


@pytest.fixture(scope="module")
def wrn16_1():
    variables = random_variables("wrn16_1", 10)
    return variables, to_torch_state_dict(variables, 16, 1, 10)


@pytest.mark.parametrize("name", ti.WRN_MODELS)
def test_expected_keys_are_the_reference_state_dict(name):
    depth, widen = (int(s) for s in name[3:].split("_"))
    ref = {
        k: s
        for k, s in reference_state_dict_shapes(depth, widen, 43).items()
        if not k.endswith("num_batches_tracked")
    }
    got = {k: shape for k, (_, _, shape) in ti.expected_torch_keys(name, 43, SMALL).items()}
    assert got == ref


def test_roundtrip_is_exact(wrn16_1):
    variables, sd = wrn16_1
    out = ti.torch_state_dict_to_flax(sd, "wrn16_1", 10, SMALL)
    chex.assert_trees_all_equal(out, variables)
    # DataParallel's `module.` prefix is dropped.
    prefixed = {"module." + k: v for k, v in sd.items()}
    out = ti.torch_state_dict_to_flax(prefixed, "wrn16_1", 10, SMALL)
    chex.assert_trees_all_equal(out, variables)


@pytest.mark.parametrize("name", ti.WRN_MODELS)
def test_infer_architecture(name):
    depth, widen = (int(s) for s in name[3:].split("_"))
    shapes = reference_state_dict_shapes(depth, widen, 43)
    sd = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    assert ti.infer_wrn_architecture(sd) == (name, 43)


def test_missing_key(wrn16_1):
    sd = dict(wrn16_1[1])
    del sd["block2.layer.0.convShortcut.weight"]
    with pytest.raises(ValueError, match=r"missing keys: block2\.layer\.0\.convShortcut\.weight"):
        ti.torch_state_dict_to_flax(sd, "wrn16_1", 10, SMALL)


def test_unexpected_key(wrn16_1):
    sd = dict(wrn16_1[1], **{"fc2.weight": np.zeros((10, 64), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys: fc2\.weight"):
        ti.torch_state_dict_to_flax(sd, "wrn16_1", 10, SMALL)


def test_misshaped_key(wrn16_1):
    sd = dict(wrn16_1[1])
    key = "block3.layer.1.conv2.weight"
    sd[key] = np.transpose(sd[key], (2, 3, 1, 0))  # left in our HWIO layout
    expected = re.escape(key) + r" has shape \(3, 3, 64, 64\).*needs \(64, 64, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        ti.torch_state_dict_to_flax(sd, "wrn16_1", 10, SMALL)


def test_class_count_mismatch_names_the_fix(wrn16_1):
    with pytest.raises(ValueError, match=r"10 classes.*num_classes=43.*--num-classes 10"):
        ti.torch_state_dict_to_flax(wrn16_1[1], "wrn16_1", 43, SMALL)


def test_wrong_architecture_names_the_right_one(wrn16_1):
    hint = "looks like wrn16_1 with 10 classes: pass --model wrn16_1"
    with pytest.raises(ValueError, match=hint):
        ti.torch_state_dict_to_flax(wrn16_1[1], "wrn40_1", 10, SMALL)
    with pytest.raises(ValueError, match="only the paper's WideResNet"):
        ti.torch_state_dict_to_flax(wrn16_1[1], "resnet18", 10, SMALL)


def test_other_wideresnet_layout_is_refused(wrn16_1):
    # Trap-and-Replace / FixMatch WRN: `block1.0.*`, biased convs, LeakyReLU: not importable.
    sd = {k.replace(".layer.", "."): v for k, v in wrn16_1[1].items()}
    sd["conv1.bias"] = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="FixMatch-style WideResNet"):
        ti.torch_state_dict_to_flax(sd, "wrn16_1", 10, SMALL)


def test_non_finite_and_duplicate_keys(wrn16_1):
    sd = dict(wrn16_1[1])
    sd["bn1.running_var"] = np.full(64, np.nan, np.float32)
    with pytest.raises(ValueError, match=r"bn1\.running_var holds NaN"):
        ti.torch_state_dict_to_flax(sd, "wrn16_1", 10, SMALL)
    sd = dict(wrn16_1[1], **{"module.fc.bias": wrn16_1[1]["fc.bias"]})
    with pytest.raises(ValueError, match="both 'fc.bias' and 'module.fc.bias'"):
        ti.torch_state_dict_to_flax(sd, "wrn16_1", 10, SMALL)


def test_unwrap_state_dict(wrn16_1):
    sd = wrn16_1[1]
    # The layout of Trap-and-Replace's latest.pth: the weights under 'model', beside other state.
    wrapped = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 199,
               "best_clean_acc": 0.93, "training_losses": [0.5, 0.4]}
    assert ti.unwrap_state_dict(wrapped) is sd
    assert ti.unwrap_state_dict({"state_dict": sd}) is sd
    assert ti.unwrap_state_dict({"net": sd}) is sd
    assert ti.unwrap_state_dict(sd) is sd
    with pytest.raises(ValueError, match="non-tensor entries"):
        ti.unwrap_state_dict({"epoch": 3, "fc.weight": np.zeros(2)})
    with pytest.raises(ValueError, match="not a state_dict"):
        ti.unwrap_state_dict([np.zeros(2)])


def test_missing_torch_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    path = tmp_path / "teacher.pth"
    path.write_bytes(b"not read")
    with pytest.raises(ImportError, match=r"pip install abd-jax\[torch\].*\.safetensors"):
        ti.read_torch_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        ti.read_torch_checkpoint(tmp_path / "absent.pth")


def test_cli_npz_to_teacher_and_back(tmp_path, wrn16_1, capsys):
    variables, sd = wrn16_1
    src = tmp_path / "teacher.npz"
    np.savez(src, **{"module." + k: v for k, v in sd.items()})
    dst = tmp_path / "imported"
    # --model / --num-classes inferred from the shapes.
    assert ti.main([str(src), str(dst), "--image-size", "8", "--dataset", "cifar10"]) == 0
    assert "imported wrn16_1 (10 classes" in capsys.readouterr().out
    _, loaded, meta = load_teacher(dst, expected_num_classes=10, expected_image_shape=SMALL)
    chex.assert_trees_all_equal(jax.device_get(loaded), variables)
    assert meta["model"] == "wrn16_1" and meta["dataset"] == "cifar10"
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["source_file"] == str(src.absolute())
    # An explicit, wrong architecture fails with the fix and writes nothing.
    assert ti.main([str(src), str(tmp_path / "bad"), "--model", "wrn16_2"]) == 1
    assert "--model wrn16_1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_safetensors_file(tmp_path, wrn16_1):
    st = pytest.importorskip("safetensors.numpy")
    variables, sd = wrn16_1
    path = tmp_path / "teacher.safetensors"
    st.save_file(sd, str(path))
    read = ti.read_torch_checkpoint(path)
    assert set(read) == set(sd)
    chex.assert_trees_all_equal(ti.torch_state_dict_to_flax(read, "wrn16_1", 10, SMALL), variables)


# ----------------------------------------------------------------------------------------------
# With PyTorch: the same architecture written in PyTorch, compared logit by logit.

LOGIT_ATOL = 1e-4  # float32 on CPU; PyTorch and XLA sum the convolutions in different orders
LOGIT_RTOL = 1e-4


def torch_wideresnet(torch, depth: int, widen: int, classes: int):
    """A PyTorch WideResNet with the reference's structure and state_dict names."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin)  # eps 1e-5, PyTorch's default
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.equal = cin == cout
            self.convShortcut = (
                None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
            )

        def forward(self, x):
            act = F.relu(self.bn1(x))  # pre-activation
            out = self.conv2(F.relu(self.bn2(self.conv1(act))))
            # The projection reads the *activated* input, the identity the raw one.
            return (x if self.equal else self.convShortcut(act)) + out

    class Stage(nn.Module):
        def __init__(self, n: int, cin: int, cout: int, stride: int):
            super().__init__()
            self.layer = nn.Sequential(
                *[Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
            )

        def forward(self, x):
            return self.layer(x)

    class WRN(nn.Module):
        def __init__(self):
            super().__init__()
            n = (depth - 4) // 6
            ch = [16, 16 * widen, 32 * widen, 64 * widen]
            self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
            self.block1 = Stage(n, ch[0], ch[1], 1)
            self.block2 = Stage(n, ch[1], ch[2], 2)
            self.block3 = Stage(n, ch[2], ch[3], 2)
            self.bn1 = nn.BatchNorm2d(ch[3])
            self.fc = nn.Linear(ch[3], classes)

        def forward(self, x):
            a1 = self.block1(self.conv1(x))
            a2 = self.block2(a1)
            a3 = self.block3(a2)
            out = F.adaptive_avg_pool2d(F.relu(self.bn1(a3)), 1).flatten(1)
            return self.fc(out), (a1, a2, a3)

    net = WRN()
    with torch.no_grad():  # random BN affine and running statistics, so eval mode is exercised
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                # Small variances too, so that a wrong BN epsilon would show in the logits.
                m.running_var.uniform_(0.05, 2.0)
                m.num_batches_tracked.fill_(1000)
        net.fc.weight.mul_(10.0)  # logits of a trained teacher's size (~10), not ~1
        net.fc.bias.normal_(0.0, 0.5)
    return net.eval()


@pytest.mark.parametrize(
    "name,hw",
    # (15, 17): odd sizes, where stride-2 convs depend on PyTorch's symmetric padding.
    [("wrn16_2", (32, 32)), ("wrn40_2", (32, 32)), ("wrn16_1", (15, 17))],
)
def test_logits_match_pytorch(tmp_path, name, hw, record_property):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    depth, widen = (int(s) for s in name[3:].split("_"))
    net = torch_wideresnet(torch, depth, widen, 10)
    path = tmp_path / "teacher.pth"
    torch.save(net.state_dict(), path)

    sd = ti.read_torch_checkpoint(path)
    image_shape = (*hw, 3)
    variables = ti.torch_state_dict_to_flax(sd, name, 10, image_shape)

    x = np.random.default_rng(0).normal(size=(4, 3, *hw)).astype(np.float32)  # normalized NCHW
    with torch.no_grad():
        t_logits, t_feats = net(torch.from_numpy(x))
    j_logits, j_feats = get_model(name, 10).apply(variables, x.transpose(0, 2, 3, 1), train=False)
    diff = float(np.max(np.abs(np.asarray(j_logits) - t_logits.numpy())))
    record_property("max_abs_logit_diff", diff)
    print(f"{name} {hw}: max |logit| {float(t_logits.abs().max()):.3f}, max abs diff {diff:.2e}")
    np.testing.assert_allclose(
        np.asarray(j_logits), t_logits.numpy(), rtol=LOGIT_RTOL, atol=LOGIT_ATOL
    )
    for jf, tf in zip(j_feats, t_feats):  # the attention-transfer features as well
        np.testing.assert_allclose(
            np.asarray(jf), tf.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4
        )


def test_wrapped_dataparallel_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    net = torch_wideresnet(torch, 16, 1, 43)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "latest.pth"
    # Trap-and-Replace's latest.pth layout, saved from a DataParallel model.
    torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()},
                "optimizer": opt.state_dict(), "epoch": 199, "training_losses": [0.5, 0.4]}, path)
    dst = tmp_path / "imported"
    meta = ti.import_teacher(path, dst, image_size=8, dataset="gtsrb")
    assert (meta["model"], meta["num_classes"]) == ("wrn16_1", 43)
    model, variables, _ = load_teacher(dst, expected_num_classes=43, expected_image_shape=SMALL)
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        t_logits = net(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(
        np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1), train=False)[0]),
        t_logits, rtol=LOGIT_RTOL, atol=LOGIT_ATOL,
    )


_UNPICKLED = []


def _record_unpickling() -> None:
    _UNPICKLED.append(True)


class _Payload:
    """Runs `_record_unpickling` if anything ever unpickles it (a stand-in for malicious code)."""

    def __reduce__(self):
        return _record_unpickling, ()


def test_objects_in_the_pickle_are_refused_not_run(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.bias": torch.zeros(2)}, "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="weights-only load refused"):
        ti.read_torch_checkpoint(path)
    assert not _UNPICKLED
