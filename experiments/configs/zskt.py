"""python -m abd_jax.cli --config experiments/configs/zskt.py --workdir runs/zskt

Data-free ZSKT distillation (spec 6.1) of the poisoned teacher (trained first into
WORKDIR/teacher, or reused from `--config.teacher.dir`) into a WRN-16-1 student on the embedded
digits, 300 pseudo-batches. `:smoke` runs 2 pseudo-batches with tiny models for tests.
"""

from experiments.configs.common import abd_section, base_config, is_smoke, shrink_for_smoke, zskt_config


def get_config(arg: str | None = None):
    smoke = is_smoke(arg)
    c = base_config("zskt", smoke)
    c.zskt = zskt_config(pseudo_batches=2 if smoke else 300)
    if smoke:
        shrink_for_smoke(c)
        c.zskt.batch_size = 16
        c.zskt.n_student_steps = 1  # unrolled: each one is compiled
        c.zskt.generator_width = 16
    # +ABD in experiments.methods: SR over the last 10 pseudo-batches (the quickstart's --abd length).
    c.abd = abd_section(1 if smoke else 10)
    return c
