"""python -m abd_jax.cli --config experiments/configs/deepinversion.py --workdir runs/deepinversion

(Adaptive) DeepInversion on CMI's machinery: the image batch itself is optimized (no generator) with
BN-statistics, one-hot, adversarial and total-variation losses, upstream weights
(`CMIConfig.deepinversion`: bn 10, oh 1, adv 1, tv 1e-3, lr 0.1), then KD on the pool; scaled to this
CPU like experiments/configs/cmi.py. ABD: `--config.cmi.sv=True`, `--config.cmi.sr_steps=50`.
`:smoke` shrinks it for tests.
"""

from experiments.configs.cmi import get_config as cmi_get_config

# The upstream DeepInversion weights (CMIConfig.deepinversion), without its 1,000 iterations / batch 256.
DEEPINVERSION = dict(lr_g=0.1, bn=10.0, oh=1.0, adv=1.0, cr=0.0, tv=1e-3, l2=0.0)


def get_config(arg: str | None = None):
    return cmi_get_config(arg, method="deepinversion", digits=DEEPINVERSION)
