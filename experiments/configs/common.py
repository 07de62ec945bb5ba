"""Shared building blocks of the experiment configs (ml_collections.ConfigDict)."""

from __future__ import annotations

import ml_collections


def data_config(name: str = "digits", image_size: int = 16) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.image_size = image_size
    c.data_dir = ""
    # Horizontal flips mirror handwritten digits into other glyphs, so the digits configs turn
    # flips off; CIFAR-10/GTSRB keep the spec's crop + flip.
    c.flip = name not in ("digits",)
    return c


def attack_config(trigger: str = "badnets_grid", target: int = 0) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.trigger = trigger
    c.target = target
    c.ratio = 0.1
    c.holdout = 0.05
    c.trigger_seed = 0
    c.pattern_file = ""
    return c


def teacher_config(epochs: int = 30) -> ml_collections.ConfigDict:
    """Spec 8 (CIFAR-10): SGD(0.9) lr 0.1, wd 5e-4, cosine, batch 128; 200 epochs there."""
    c = ml_collections.ConfigDict()
    c.model = "wrn16_2"
    c.epochs = epochs
    c.batch_size = 128
    c.optimizer = "sgd"
    c.lr = 0.1
    c.weight_decay = 5e-4
    c.eval_every = 5
    c.dir = ""  # a saved teacher to reuse instead of training one
    return c


def zskt_config(pseudo_batches: int = 300) -> ml_collections.ConfigDict:
    """Spec 6.1 recipe; only the run length differs from the paper's 80,000 pseudo-batches."""
    c = ml_collections.ConfigDict()
    c.pseudo_batches = pseudo_batches
    c.student = "wrn16_1"
    c.batch_size = 128
    c.z_dim = 100
    c.n_student_steps = 10
    c.lr_student = 2e-3
    c.lr_generator = 1e-3
    c.beta = 250.0
    c.temperature = 1.0
    c.clip_norm = 5.0
    c.schedule = "cosine"
    c.generator_width = 128
    c.generator_out = "none"
    c.generator_upsample = "fused"  # "separate": as before 2026-11-27 (ZSKTConfig.generator_upsample)
    c.fuse = "unroll"
    c.scan_unroll = 1
    c.eval_every = 0
    # ABD (used by the quickstart's --abd rows; spec 3 and 4 defaults). SR runs over the last
    # `sr_pseudo_batches` (the reference: the last ~0.5-0.75% of 80,000; here a longer share of a
    # short run, since SR needs enough steps to act).
    c.sv = False
    c.sv_coef = 0.1
    c.sv_copies = 3
    c.sv_layers = 5
    c.sv_verify_after = 0  # spec 3.4 verification after P warm-up pseudo-batches; 0 = off (released)
    c.sv_verify_threshold = 0.02  # the tail ratio a shuffle must exceed
    c.sv_share_prefix = True  # False: every shuffled copy run whole, as before 2026-11-27
    c.sv_share_teacher = True  # False: the generator step's teacher forward separate, as before 2026-11-28
    c.sr_pseudo_batches = 0
    c.sr_coef = 1.0
    c.sr_resume_lr = 5e-4
    c.sr_rounds = 10
    c.sr_pert_lr = 0.1
    c.sr_l2 = 1e-3
    c.sr_portion = 0.02
    c.sr_fp_iterations = 5
    c.sr_trigger_model = "teacher"
    c.sr_init_scale = 0.0  # the trigger search's start: 0 = the spec's zero (ABDOptions.sr_init_scale)
    c.sr_restarts = 1  # random starts of the trigger search, the best kept (ABDOptions.sr_restarts)
    c.sr_fresh_starts = False  # True: each batch's starts from its own key (ABDOptions.sr_fresh_starts)
    c.sr_max_norm = 0.0  # L2 bound of the trigger search, 0 = unbounded (ABDOptions.sr_max_norm)
    c.sr_fuse = "host"  # how the SR pseudo-batch is compiled (ZSKTConfig.sr_fuse)
    c.sr_bn_replay = True  # the SR forwards move the BN running stats, as the reference (ABDOptions)
    c.sr_memory = 0  # generator samples pooled for the SR phase, 0 = none (ZSKTConfig.sr_memory)
    c.sr_memory_share = 0.5  # their share of each SR batch (ZSKTConfig.sr_memory_share)
    return c


def clean_kd_config(epochs: int = 170) -> ml_collections.ConfigDict:
    """Spec 6.4: 20% clean data, T = 6, alpha 0.95, SGD lr 0.1 (constant), wd 5e-4, batch 128."""
    c = ml_collections.ConfigDict()
    c.student = "wrn16_1"
    c.fraction = 0.2
    c.epochs = epochs
    c.batch_size = 128
    c.lr = 0.1
    c.weight_decay = 5e-4
    c.temperature = 6.0
    c.alpha = 0.95
    c.eval_every = 10
    return c


def base_config(job: str, smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = job
    c.seed = 0
    # Each phase (teacher training, a ZSKT run's parts, clean KD) checkpoints into
    # WORKDIR/checkpoints every this many of its steps, at its end and on SIGTERM; `--resume`
    # continues from there exactly (abd_jax/resume.py).
    c.checkpoint_every = 1000
    c.data = data_config()
    c.attack = attack_config()
    c.teacher = teacher_config(epochs=2 if smoke else 30)
    return c


# The smoke configs' teacher and students: the smallest WideResNet, since most of a smoke run is XLA
# compile time, which grows with depth. The same code paths as WRN-16-1 (residual blocks, 1x1
# shortcuts, BatchNorm), one block per stage.
SMOKE_MODEL = "wrn10_1"


def shrink_for_smoke(c: ml_collections.ConfigDict) -> None:
    """The `:smoke` sizes every job shares (so all smoke jobs of a trigger and seed reuse one saved
    teacher): 8x8 images, a one-epoch SMOKE_MODEL teacher, SMOKE_MODEL students in every section."""
    c.data.image_size = 8
    c.teacher.model = SMOKE_MODEL
    c.teacher.epochs = 1
    for section in c.values():
        if isinstance(section, ml_collections.ConfigDict) and "student" in section:
            section.student = SMOKE_MODEL


def is_smoke(arg: str | None) -> bool:
    if arg not in (None, "", "smoke"):
        raise ValueError(f"config argument must be empty or 'smoke', got {arg!r}")
    return arg == "smoke"


def dataclass_section(method: str, **overrides) -> ml_collections.ConfigDict:
    """A config section holding every field of `method`'s typed config (abd_jax.methods) at its
    default, then `overrides`: the section can never drift from the dataclass, and every field is
    overridable from the command line (`--config.<section>.<field>=...`)."""
    import dataclasses

    from abd_jax.methods import config_class, get_method

    cls = config_class(method)
    values = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"{method}: unknown {get_method(method).section} fields {sorted(unknown)}")
    values.update(overrides)
    values.update(get_method(method).fixed)  # e.g. synthesizer="deepinversion"
    return ml_collections.ConfigDict({k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()})


def method_job_config(method: str, smoke: bool, full: dict, smoke_overrides: dict) -> ml_collections.ConfigDict:
    """The job config of a data-free KD method on the embedded digits: the quickstart's teacher
    (a WRN-16-1, so every method's job reuses the same saved teacher for a given trigger and seed),
    the method's section with the digits settings `full`, shrunk by `smoke_overrides` for tests."""
    from abd_jax.methods import get_method

    c = base_config(method, smoke)
    c.teacher.model = "wrn16_1"
    values = {**full, **(smoke_overrides if smoke else {})}
    c[get_method(method).section] = dataclass_section(method, **values)
    if smoke:
        shrink_for_smoke(c)
    return c


def abd_section(sr_steps: int) -> ml_collections.ConfigDict:
    """What `experiments.methods` (and `jobs.run_method(abd_parts=...)`) use when +ABD switches
    Self-Retrospection on: the length of the SR phase in the method's own steps (pseudo-batches
    for the ZSKT family, KD steps for CMI and OOD-KD). A plain CLI run of the config ignores it
    and runs the method section as written."""
    return ml_collections.ConfigDict({"sr_steps": sr_steps})
