"""python -m abd_jax.cli --config experiments/configs/dafl.py --workdir runs/dafl

DAFL (a non-adversarial generator trained for confident, class-balanced, strongly activating teacher
outputs; the student learns KL(T||S) on its images) on the embedded digits, as an option of the
ZSKT pseudo-batch: the quickstart's ZSKT settings (300 pseudo-batches) with DAFL's upstream
hyper-parameters (`abd_jax.kd.generator_losses.method_defaults("dafl")`, docs/DFAD_DAFL.md).
ABD: `--config.zskt.sv=True`, `--config.zskt.sr_pseudo_batches=10`. `:smoke` shrinks it for tests.
"""

from experiments.configs.dfad import get_config as dfad_get_config


def get_config(arg: str | None = None):
    return dfad_get_config(arg, method="dafl")
