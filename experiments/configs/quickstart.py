"""python -m experiments.quickstart --workdir runs/quickstart

The main job on the embedded digits (16x16): a BadNets-grid poisoned WRN-16-1 teacher, vanilla
ZSKT (300 pseudo-batches, spec 6.1 recipe) and clean KD (spec 6.4) into WRN-16-1 students; a table
of Acc / ASR / clean target rate. `:smoke` is a seconds-long version for tests.
"""

from experiments.configs.common import base_config, is_smoke, shrink_for_smoke
from experiments.configs.zskt import get_config as zskt_get_config
from experiments.configs.clean_kd import get_config as clean_get_config


def get_config(arg: str | None = None):
    smoke = is_smoke(arg)
    c = base_config("quickstart", smoke)
    c.zskt = zskt_get_config(arg).zskt
    c.clean_kd = clean_get_config(arg).clean_kd
    # A WRN-16-1 teacher for the WRN-16-1 student: with the spec's WRN-16-2 teacher the student
    # learns the clean task but not the backdoor on this data (ASR 17%); with a teacher of the
    # student's own architecture the backdoor transfers (docs/ZSKT.md).
    c.teacher.model = "wrn16_1"
    if smoke:
        shrink_for_smoke(c)
    return c


SR_COEF = 50.0
SR_INIT_SCALE = 1e-3
SR_RESTARTS = 4
SR_RESUME_LR = 5e-4
SR_ROUNDS = 20
SR_REFINE_ROUNDS = 20
SV_VERIFY_AFTER = 50


def add_abd_settings(c, smoke: bool) -> None:
    """The `--abd` rows' settings (quickstart, and the ZSKT rows of experiments.tables' digits scale)."""
    # SR over the last k pseudo-batches of each run (spec 4.2 resume).
    c.zskt.sr_pseudo_batches = 1 if smoke else 10
    # The reference adds the SR gradient unweighted but over 4,010-6,010 SR steps; here SR has 100.
    # Weighting it by 50 stands in for the missing steps; chosen with experiments/sr_sweep.py on
    # seed 0 (coef 1 / 25 / 50 / 100: ASR 78.3 / 20.4 / 13.5 / 18.0), docs/ABD_SR.md.
    c.zskt.sr_coef = SR_COEF
    # The trigger search from small random starts, the best of four kept (a departure from the
    # spec's zero start, whose first step is rounding noise): on seed 0 the zero start found a
    # perturbation that is not the backdoor's (3.2% of clean images to the target) and every
    # random-start setting found one that is (100%); docs/ABD_SR.md "Where the trigger search starts".
    c.zskt.sr_init_scale = SR_INIT_SCALE
    c.zskt.sr_restarts = 1 if smoke else SR_RESTARTS  # smoke: one start (compile time)
    # The SR phase's fresh Adam at the reference's 5e-4 and a trigger search of R = 20 rounds (a
    # value of the reference's sweeps, marked there as giving lower ASR). With the BN replay, from
    # the same resumed states, R = 10 / 1e-3 (the setting from e8bd436 to 2026-11-28) ended at
    # 82.0 / 52.7 (Acc / ASR) on seed 0 and 88.2 / 8.1 on seed 5; R = 20 / 5e-4 at 84.2 / 19.0 and
    # 84.9 / 8.9 (plain endings 84.7 / 88.9 and 91.1 / 77.3). docs/ABD_SR.md.
    c.zskt.sr_resume_lr = SR_RESUME_LR
    c.zskt.sr_rounds = SR_ROUNDS
    # The teacher's trigger refined on the current student (eval mode) towards the class the
    # teacher's trigger points at, 20 rounds, so SR unlearns what the student still answers to (a
    # departure: the reference unlearns the teacher's trigger as it is). From the same resumed
    # states the plain teacher's trigger ends at 84.2 / 19.0 (Acc / ASR) on seed 0 and 89.8 / 9.6 on
    # seed 8, the refined one at 86.2 / 1.7 and 90.4 / 4.4 (plain endings 84.7 / 88.9 and
    # 96.2 / 65.5); docs/ABD_SR.md "Refining the trigger on the student".
    c.zskt.sr_refine_rounds = SR_REFINE_ROUNDS
    # SV only where a proper vaccine is found (the paper's policy, spec 3.4), with the ZSKT-GTSRB
    # sweep's P = 50: the vanilla run's first 50 pseudo-batches are the warm-up, and a rejected
    # vaccine makes the SV rows the vanilla rows (distill_zskt_ablation). The smoke run is too
    # short to verify and keeps SV always on (the ZSKT-CIFAR10 sweep's P = 0).
    c.zskt.sv_verify_after = 0 if smoke else SV_VERIFY_AFTER
    if smoke:
        c.zskt.sr_rounds, c.zskt.sr_fp_iterations = 2, 1  # unrolled iterations: compile time
        c.zskt.sr_refine_rounds = 2
