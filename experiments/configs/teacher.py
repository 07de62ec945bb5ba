"""python -m abd_jax.cli --config experiments/configs/teacher.py --workdir runs/teacher

Trains a poisoned WRN-16-2 teacher on the embedded digits (16x16) with BadNets-grid, target 0,
poison ratio 0.1, 5% clean holdout (spec 7, 8). Override anything on the command line, e.g.
`--config.attack.trigger=blend --config.data.image_size=32`. `:smoke` shrinks it for tests.
"""

from experiments.configs.common import base_config, is_smoke, shrink_for_smoke


def get_config(arg: str | None = None):
    smoke = is_smoke(arg)
    c = base_config("teacher", smoke)
    if smoke:
        shrink_for_smoke(c)
    return c
