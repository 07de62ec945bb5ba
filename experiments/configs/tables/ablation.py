"""python -m experiments.tables --table experiments/configs/tables/ablation.py:digits --workdir runs/tables

Spec 9.4 (poster panel 4): which ABD component does what, ZSKT against BadNets-grid and Trojan-WM:
vanilla, SV only, SR only, SV + SR, and clean KD. The four ZSKT rows come from one
`distill_zskt_ablation` (the SV and SR runs share what they can with the vanilla run).
"""

from experiments.configs.tables.base import table_config

PAPER = {  # spec 9.4: Acc / ASR %
    "badnets_grid": {"zskt": [70.7, 87.8], "zskt+sv": [67.2, 0.3], "zskt+sr": [68.3, 76.2],
                     "zskt+abd": [68.3, 0.7], "clean_kd": [74.6, 4.3]},
    "trojan_wm": {"zskt": [82.7, 93.9], "zskt+sv": [79.0, 57.0], "zskt+sr": [79.7, 44.1],
                  "zskt+abd": [78.2, 22.5], "clean_kd": [77.5, 11.1]},
}


def get_config(arg: str | None = None):
    return table_config(
        "ablation", arg, title="ABD component ablation (ZSKT)", spec="9.4",
        columns=["teacher", "zskt", "zskt+sv", "zskt+sr", "zskt+abd", "clean_kd"],
        groups={t: {"trigger": t} for t in PAPER}, paper=PAPER,
        note="Paper: CIFAR-10, WRN-16-2 -> WRN-16-1; its vanilla BadNets line (70.7/87.8) differs from 9.1's (71.9/96.9).")
