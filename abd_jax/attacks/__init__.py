"""Backdoor attacks (spec 7): triggers, training-set poisoning, the ASR test set."""

from abd_jax.attacks.poison import (
    CLEAN_LABEL_TRIGGERS,
    PoisonedTrainSet,
    is_clean_label,
    make_asr_set,
    pgd_perturb,
    poison_training_set,
)
from abd_jax.attacks.triggers import (
    MODES,
    TRIGGER_NAMES,
    Trigger,
    apply_trigger,
    apply_trigger_np,
    apply_trigger_unclipped,
    load_pattern_file,
    make_trigger,
)

__all__ = [
    "CLEAN_LABEL_TRIGGERS",
    "MODES",
    "TRIGGER_NAMES",
    "PoisonedTrainSet",
    "Trigger",
    "apply_trigger",
    "apply_trigger_np",
    "apply_trigger_unclipped",
    "is_clean_label",
    "load_pattern_file",
    "make_asr_set",
    "make_trigger",
    "pgd_perturb",
    "poison_training_set",
]
