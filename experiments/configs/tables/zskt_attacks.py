"""python -m experiments.tables --table experiments/configs/tables/zskt_attacks.py:digits --workdir runs/tables

Spec 9.1 (the paper's main table, poster panel 1): ZSKT with and without ABD against ten backdoor
attacks, with the poisoned teacher and clean KD beside them. CIFAR-10 at the paper's scale
(`:cifar10`, GPU), WRN-16-2 -> WRN-16-1; on the embedded digits (`:digits`) the quickstart's
setting. The paper's "(s)" rows (BadNets-sq, SIG, l2_inv, l0_inv) used SV instead of SR; here
ZSKT+ABD is SV + SR on every row (SV only where its vaccine passes verification at the digits
scale; spec 3.4), and the ablation table has the SV-only row.
"""

from experiments.configs.tables.base import table_config

PAPER = {  # spec 9.1: Acc / ASR %
    "badnets_grid": {"teacher": [92.1, 99.9], "zskt": [71.9, 96.9], "zskt+abd": [68.3, 0.7], "clean_kd": [74.6, 4.3]},
    "trojan_wm": {"teacher": [93.8, 100.0], "zskt": [82.7, 93.9], "zskt+abd": [78.2, 22.5], "clean_kd": [77.5, 11.1]},
    "trojan_3x3": {"teacher": [93.4, 98.7], "zskt": [80.9, 96.8], "zskt+abd": [71.7, 33.3], "clean_kd": [72.9, 1.7]},
    "blend": {"teacher": [93.9, 99.7], "zskt": [77.0, 74.4], "zskt+abd": [71.5, 23.1], "clean_kd": [78.0, 4.3]},
    "trojan_8x8": {"teacher": [93.7, 99.6], "zskt": [80.5, 57.2], "zskt+abd": [72.6, 17.8], "clean_kd": [75.2, 9.3]},
    "badnets_sq": {"teacher": [93.4, 97.8], "zskt": [80.8, 37.8], "zskt+abd": [77.9, 1.9], "clean_kd": [76.2, 9.1]},
    "cl": {"teacher": [91.2, 94.3], "zskt": [76.8, 17.5], "zskt+abd": [67.4, 10.2], "clean_kd": [69.4, 2.1]},
    "sig": {"teacher": [90.5, 97.3], "zskt": [77.9, 0.0], "zskt+abd": [72.2, 0.0], "clean_kd": [77.4, 0.0]},
    "l2_inv": {"teacher": [93.9, 100.0], "zskt": [82.0, 0.3], "zskt+abd": [70.7, 1.9], "clean_kd": [77.2, 1.2]},
    "l0_inv": {"teacher": [92.4, 99.6], "zskt": [72.8, 8.3], "zskt+abd": [69.4, 0.0], "clean_kd": [79.2, 3.7]},
}


def get_config(arg: str | None = None):
    return table_config(
        "zskt_attacks", arg, title="ZSKT with and without ABD against ten attacks", spec="9.1",
        columns=["teacher", "zskt", "zskt+abd", "clean_kd"],
        groups={t: {"trigger": t} for t in PAPER}, paper=PAPER,
        note="Paper: CIFAR-10, WRN-16-2 -> WRN-16-1; ZSKT+ABD on BadNets-sq, SIG, l2_inv, l0_inv was SV only.")
