"""python -m abd_jax.cli --config experiments/configs/dfad.py --workdir runs/dfad

DFAD (data-free adversarial distillation: the generator maximizes the L1 distance between teacher
and student logits, the student minimizes it) on the embedded digits, as an option of the ZSKT
pseudo-batch: the quickstart's ZSKT settings (300 pseudo-batches) with DFAD's upstream
hyper-parameters (`abd_jax.kd.generator_losses.method_defaults("dfad")`, docs/DFAD_DAFL.md).
ABD: `--config.zskt.sv=True`, `--config.zskt.sr_pseudo_batches=10`. `:smoke` shrinks it for tests.
"""

from experiments.configs.common import abd_section, is_smoke
from experiments.configs.zskt import get_config as zskt_get_config


def get_config(arg: str | None = None, method: str = "dfad"):
    from abd_jax.kd.generator_losses import method_defaults

    c = zskt_get_config(arg)
    c.job = method
    smoke = is_smoke(arg)
    if not smoke:  # (smoke: zskt.py's SMOKE_MODEL teacher)
        c.teacher.model = "wrn16_1"  # the quickstart's teacher, shared by every method's job
    for k, v in method_defaults(method).items():
        c.zskt[k] = v
    if smoke:
        c.zskt.n_student_steps = 1  # unrolled: each one is compiled
    # +ABD in experiments.methods: SR over the last 10 of the 300 pseudo-batches, as the quickstart.
    c.abd = abd_section(1 if smoke else 10)
    return c
