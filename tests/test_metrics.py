import jax.numpy as jnp
import numpy as np

from abd_jax.attacks import make_asr_set, make_trigger
from abd_jax.metrics import batched_predict, evaluate_backdoor


def test_asr_excludes_target_class_and_reports_clean_target_rate():
    x = np.zeros((30, 8, 8, 3), np.uint8)
    y = np.repeat(np.arange(3), 10).astype(np.int32)
    x[:, 0, 0, 0] = y  # encode the label in a pixel so a "model" can read it
    trig = make_trigger("badnets_grid", 8)
    x_bd, x_bd_clean = make_asr_set(x, y, trig, target=0)
    assert len(x_bd) == 20  # the 10 target-class images are excluded

    def predict_backdoored(xb):  # perfect classifier with a backdoor to class 0
        label = xb[:, 0, 0, 0].astype(jnp.int32)
        triggered = xb[:, -1, -1, :].sum(-1) > 0
        return jnp.eye(3)[jnp.where(triggered, 0, label)]

    m = evaluate_backdoor(predict_backdoored, x, y, x_bd, x_bd_clean, target=0, batch_size=7)
    assert m == {"acc": 100.0, "asr": 100.0, "clean_target_rate": 0.0}

    collapsed = lambda xb: jnp.tile(jnp.array([[1.0, 0, 0]]), (len(xb), 1))  # noqa: E731
    m = evaluate_backdoor(collapsed, x, y, x_bd, x_bd_clean, target=0, batch_size=7)
    assert m["asr"] == 100.0 and m["clean_target_rate"] == 100.0  # collapse, not a backdoor


def test_batched_predict_pads_last_batch():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    preds = batched_predict(lambda xb: jnp.stack([xb[:, 0, 0, 0], -xb[:, 0, 0, 0]], -1), x, 4)
    np.testing.assert_array_equal(preds, np.where(np.arange(10) > 0, 0, 0))
    assert preds.shape == (10,)
