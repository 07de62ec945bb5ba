"""python -m abd_jax.cli --config experiments/configs/clean_kd.py --workdir runs/clean_kd

The clean-data KD baseline (spec 6.4): 20% of the clean digits, T = 6, 170 epochs, WRN-16-1
student of the poisoned teacher. `:smoke` shrinks it for tests.
"""

from experiments.configs.common import base_config, clean_kd_config, is_smoke, shrink_for_smoke


def get_config(arg: str | None = None):
    smoke = is_smoke(arg)
    c = base_config("clean_kd", smoke)
    c.clean_kd = clean_kd_config(epochs=1 if smoke else 170)
    if smoke:
        shrink_for_smoke(c)
        c.clean_kd.eval_every = 1
    return c
