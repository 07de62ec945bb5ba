"""python -m experiments.tables --table experiments/configs/tables/methods.py:digits --workdir runs/tables

Spec 9.2 (poster panel 2): ABD on three data-free KD families, ZSKT, CMI and OOD-KD, against
BadNets and Trojan-WM. The paper's CMI BadNets line used BadNets-sq (the others BadNets-grid), so
both BadNets lines are here. +ABD: SV and SR for ZSKT and CMI (ABD as the paper defines it; which
parts the paper's CMI/OOD rows used is not given, spec 9.2), SV only for OOD-KD (its released
sweep; SR collapses OOD-KD's student on the digits, docs/OOD_KD.md).
"""

from experiments.configs.tables.base import table_config

PAPER = {  # spec 9.2: Acc / ASR %
    "badnets_grid": {"teacher": [92.1, 99.9], "zskt": [71.9, 96.9], "zskt+abd": [68.3, 0.7],
                     "ood": [79.8, 99.6], "ood+abd": [78.2, 14.5]},
    "trojan_wm": {"teacher": [93.8, 100.0], "zskt": [82.7, 93.9], "zskt+abd": [78.2, 22.5],
                  "cmi": [89.1, 99.0], "cmi+abd": [79.8, 8.0], "ood": [82.3, 100.0], "ood+abd": [62.3, 21.8]},
    "badnets_sq": {"teacher": [93.8, 100.0], "cmi": [88.3, 95.9], "cmi+abd": [83.2, 6.0]},
}


def get_config(arg: str | None = None):
    return table_config(
        "methods", arg, title="ABD on ZSKT, CMI and OOD-KD", spec="9.2",
        columns=["teacher", "zskt", "zskt+abd", "cmi", "cmi+abd", "ood", "ood+abd"],
        groups={t: {"trigger": t} for t in PAPER}, paper=PAPER, abd_parts={"ood": ["sv"]},
        note="Paper: CIFAR-10, WRN-16-2 -> WRN-16-1; its BadNets-sq teacher is printed 93.8/100 here, 93.4/97.8 in 9.1.")
