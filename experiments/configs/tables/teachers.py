"""python -m experiments.tables --table experiments/configs/tables/teachers.py:digits --workdir runs/tables

Spec 9.5 (poster panel 5): the poisoned teacher's Acc / ASR under every attack (the paper's eleven
and WaNet, which the paper does not report), trained by the teacher config of the scale (spec 8).
"""

from experiments.configs.tables.base import table_config

PAPER = {t: {"teacher": v} for t, v in {  # spec 9.5: Acc / ASR %
    "badnets_grid": [92.1, 99.9], "blend": [93.9, 99.7], "l2_inv": [93.9, 100.0], "sig": [90.5, 97.3],
    "trojan_3x3": [93.4, 98.7], "trojan_wm": [93.8, 100.0], "badnets_sq": [93.4, 97.8], "cl": [91.2, 94.3],
    "l0_inv": [92.4, 99.6], "smooth": [93.6, 99.3], "trojan_8x8": [93.7, 99.6]}.items()}


def get_config(arg: str | None = None):
    return table_config(
        "teachers", arg, title="Poisoned teachers under every attack", spec="9.5", columns=["teacher"],
        groups={t: {"trigger": t} for t in [*PAPER, "wanet"]}, paper=PAPER,
        note="Paper: CIFAR-10, WRN-16-2 teachers; the digits scale trains the quickstart's WRN-16-1 teacher.")
