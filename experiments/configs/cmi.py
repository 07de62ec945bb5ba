"""python -m abd_jax.cli --config experiments/configs/cmi.py --workdir runs/cmi

CMI (spec 6.2: a generator re-initialized every round and inverted from the teacher with BN-statistics,
one-hot, adversarial and contrastive losses; the best batch of each round joins a synthetic pool; KD at
T = 20 on the pool) from the poisoned quickstart teacher into a WRN-16-1 student on the embedded
digits, scaled to this CPU: 15 rounds of 50 synthesis iterations (batch 64) and 50 KD steps (batch 64)
(docs/CMI.md). ABD: `--config.cmi.sv=True`, `--config.cmi.sr_steps=50` (SR over the last round).
`:smoke` shrinks it for tests.
"""

from experiments.configs.common import abd_section, is_smoke, method_job_config

DIGITS = dict(rounds=15, g_steps=50, synthesis_batch=64, kd_steps=50, batch_size=64, bank_size=960, negatives=256,
              head_dim=128, generator_width=64, flip=False, crop_pad=2, eval_every=5)
SMOKE = dict(rounds=2, g_steps=2, synthesis_batch=8, kd_steps=2, batch_size=8, bank_size=16, negatives=8, head_dim=8,
             generator_width=8, z_dim=8, eval_every=1, sr_rounds=2, sr_fp_iterations=1)


def get_config(arg: str | None = None, method: str = "cmi", digits: dict | None = None):
    smoke = is_smoke(arg)
    c = method_job_config(method, smoke, {**DIGITS, **(digits or {})}, SMOKE)
    # +ABD in experiments.methods: SV in the inversion loss and SR over the last round of KD steps.
    c.abd = abd_section(c.cmi.kd_steps)
    return c
