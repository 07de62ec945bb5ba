"""The ABD settings every data-free KD method's typed config carries (spec 3 and 4 defaults).

ZSKTConfig, CMIConfig and OODConfig inherit these fields, so "+ABD" means the same switches in
every method (`abd_jax.methods.with_abd`). The length of the SR phase is each method's own field
(`sr_pseudo_batches` for the ZSKT family, `sr_steps` for CMI and OOD-KD), in its own steps.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ABDOptions:
    """Shuffling Vaccine (spec 3) and Self-Retrospection (spec 4) settings.

    sv: use the vaccine (a penalty in the generator / inversion loss, or OOD-KD's per-sample
      weights, spec 3.3) with coefficient `sv_coef` (lambda), `sv_copies` shuffled teachers whose
      last `sv_layers` conv kernels have their input channels permuted (spec 3.1).
    sv_verify_after: 0 keeps SV on from the start (the released ZSKT-CIFAR10 and OOD sweeps);
      P > 0 first runs P steps with SV off, pools samples, and switches SV on only if a shuffle
      passes the tail-ratio test at `sv_verify_threshold` (spec 3.4; ZSKT-GTSRB: P = 50).
    sv_share_prefix: run the copies' unshuffled prefix once (`shuffle_vaccine.ensemble_logits`,
      models/prefix.py): the same logits, gradients summed in another order. False runs every
      copy whole, as before 2026-11-27 (bitwise reproduction of earlier runs).
    sr_*: Self-Retrospection, resumed with a fresh Adam at `sr_resume_lr` for the SR phase
      (spec 4.2); the trigger is synthesized in `sr_rounds` Adam steps at `sr_pert_lr` by
      `sr_trigger_model` ("teacher": the released sweeps; "student": the poster's story), applied
      to a `sr_portion` of each batch, and unlearned through the implicit hypergradient with
      `sr_fp_iterations` fixed-point iterations and inner L2 `sr_l2` (spec 4.1); `sr_coef` scales
      the SR gradient added to the KD gradient. `sr_init_scale` > 0 starts the trigger search at
      a small random perturbation instead of the spec's zero, where the search's first step is
      set by rounding noise, and `sr_restarts` > 1 keeps the best of that many random starts
      (`self_retrospection.synthesize_trigger`, docs/ABD_SR.md); `sr_fresh_starts` draws those
      starts from each batch's own key instead of the same fixed key on every batch.
      `sr_max_norm` > 0 keeps the trigger search in the L2 ball of that radius (projected after
      every step; 0, the spec: unbounded).
      `sr_refine_rounds` > 0 (with the teacher's trigger) refines the teacher's trigger for that
      many Adam rounds on the current student in eval mode, targeted at the class the teacher's
      trigger sends the batch to, so that SR unlearns what the student still answers to
      (`self_retrospection.refine_on_student`; 0, the spec: the teacher's trigger as it is).
      `sr_bn_replay` (with the
      teacher's trigger) replays the BN running-stat updates of the reference's 4 train-mode SR
      forwards before each KD forward (`self_retrospection.sr_running_stats`), as the reference;
      False leaves the running statistics to the KD forwards alone.
    """

    sv: bool = False
    sv_coef: float = 0.1
    sv_copies: int = 3
    sv_layers: int = 5
    sv_verify_after: int = 0
    sv_verify_threshold: float = 0.02
    sv_share_prefix: bool = True
    sr_coef: float = 1.0
    sr_resume_lr: float = 5e-4
    sr_rounds: int = 10
    sr_pert_lr: float = 0.1
    sr_l2: float = 1e-3
    sr_portion: float = 0.02
    sr_fp_iterations: int = 5
    sr_trigger_model: str = "teacher"
    sr_init_scale: float = 0.0
    sr_restarts: int = 1
    sr_bn_replay: bool = True
    sr_fresh_starts: bool = False
    sr_max_norm: float = 0.0
    sr_refine_rounds: int = 0

    def __post_init__(self) -> None:
        # Checked when the config is made: the trigger search only runs in the SR phase, at the
        # end of a run. Every method's config calls this from its own __post_init__.
        if self.sr_restarts < 1 or (self.sr_restarts > 1 and not self.sr_init_scale > 0):
            raise ValueError(f"sr_restarts = {self.sr_restarts} with sr_init_scale = {self.sr_init_scale}: "
                             "restarts must be >= 1, and more than 1 needs random starts; set sr_init_scale "
                             "> 0 (e.g. 1e-3) or sr_restarts = 1")
        if self.sr_refine_rounds < 0 or (self.sr_refine_rounds and self.sr_trigger_model != "teacher"):
            raise ValueError(f"sr_refine_rounds = {self.sr_refine_rounds} with sr_trigger_model = "
                             f"{self.sr_trigger_model!r}: the refinement starts from the teacher's trigger; "
                             "use sr_trigger_model = 'teacher', or sr_refine_rounds = 0")
        if self.sr_max_norm < 0:
            raise ValueError(f"sr_max_norm = {self.sr_max_norm}: the trigger's L2 bound must be >= 0 "
                             "(0 = unbounded, the spec)")

