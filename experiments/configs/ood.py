"""python -m abd_jax.cli --config experiments/configs/ood.py --workdir runs/ood

OOD-KD (spec 6.3: KD at T = 8 on patches of a single image, CutMix on every batch) from the
poisoned quickstart teacher into a WRN-16-1 student on the embedded digits: 400 steps of batch 256.
The patch source is a rendered page of printed letters (`source="letters"`, small initial crops,
2x2 pixel blocks like the digits' upsampled 8x8 glyphs): photo patches (the spec's
`china.jpg`) do not carry the digits task, the student collapses onto the teacher's favourite
class (docs/OOD_KD.md has the probes). ABD: `--config.ood.sv=True`,
`--config.ood.sr_steps=20`. `:smoke` shrinks it for tests.
"""

from experiments.configs.common import abd_section, is_smoke, method_job_config

DIGITS = dict(steps=400, batch_size=256, source="letters", init_crop=0.12, patch_block=2, flip=False)
SMOKE = dict(steps=3, batch_size=16, eval_every=1, sr_rounds=2, sr_fp_iterations=1)


def get_config(arg: str | None = None):
    smoke = is_smoke(arg)
    c = method_job_config("ood", smoke, DIGITS, SMOKE)
    # +ABD in experiments.methods: SV (the released OOD sweep) and SR over the last 20 steps.
    c.abd = abd_section(1 if smoke else 20)
    return c
