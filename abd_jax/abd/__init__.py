"""ABD's defenses as composable pieces (DESIGN.md, "ABD as composable pieces").

Shuffling Vaccine (spec 3): `abd_jax.abd.shuffle_vaccine`.
Self-Retrospection (spec 4): `abd_jax.abd.self_retrospection` (its implicit hypergradient is
`abd_jax.hypergrad`).
"""

from abd_jax.abd.self_retrospection import (
    SelfRetrospectionState,
    retrospect,
    self_retrospection,
    set_sr_coef,
    sr_active,
    sr_grads,
    sr_resume_optimizer,
    sr_running_stats,
    sr_start_step,
    synthesize_trigger,
)

from abd_jax.abd.shuffle_vaccine import (
    ShuffleVaccine,
    ensemble_logits,
    teacher_and_ensemble,
    init_shuffle_vaccine,
    make_divergence_fn,
    make_generator_penalty,
    make_teacher_and_penalty,
    make_sample_weights,
    make_shuffled_ensemble,
    ood_sample_weights,
    pool_divergences,
    reshuffle_ensemble,
    shuffle_conv_inputs,
    shuffled_kernel_paths,
    suspicion,
    summarize_reports,
    suspicion_report,
    suspicion_reports,
    sv_penalty,
    tail_ratio,
    tail_statistics,
    verify_vaccine,
)

__all__ = [
    "SelfRetrospectionState",
    "retrospect",
    "self_retrospection",
    "set_sr_coef",
    "sr_active",
    "sr_grads",
    "sr_resume_optimizer",
    "sr_running_stats",
    "sr_start_step",
    "synthesize_trigger",
    "ShuffleVaccine",
    "ensemble_logits",
    "teacher_and_ensemble",
    "init_shuffle_vaccine",
    "make_divergence_fn",
    "make_generator_penalty",
    "make_teacher_and_penalty",
    "make_sample_weights",
    "make_shuffled_ensemble",
    "ood_sample_weights",
    "pool_divergences",
    "reshuffle_ensemble",
    "shuffle_conv_inputs",
    "shuffled_kernel_paths",
    "suspicion",
    "summarize_reports",
    "suspicion_report",
    "suspicion_reports",
    "sv_penalty",
    "tail_ratio",
    "tail_statistics",
    "verify_vaccine",
]
