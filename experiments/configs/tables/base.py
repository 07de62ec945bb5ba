"""The job config behind every row of a table (experiments.tables), one per scale.

- "digits": the embedded digits at 16x16, runs on a 2-core CPU: the quickstart's WRN-16-1 teacher
  and ZSKT recipe with its `--abd` settings, the CMI and OOD-KD digits configs (docs/ZSKT.md,
  docs/CMI.md, docs/OOD_KD.md say why each differs from the paper's CIFAR-10 scale).
- "cifar10": the paper's setting (spec 6, 8): WRN-16-2 teacher trained 200 epochs, 32x32, ZSKT
  80,000 pseudo-batches with SR over the last 601, CMI 200 rounds, OOD-KD at spec 6.3. GPU/TPU.
- "gtsrb": the paper's GTSRB setting (spec 8, 4.2): target 1, batch 256, ZSKT 10,000 pseudo-batches,
  vaccine verification after 50, SR over the last 201. GPU/TPU.
- "smoke": seconds-long rows for tests.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.common import clean_kd_config, dataclass_section, zskt_config

SCALES = ("digits", "cifar10", "gtsrb", "smoke")


def job_config(scale: str) -> ml_collections.ConfigDict:
    """The data, attack, teacher and clean_kd sections, `zskt` (the ZSKT rows, run as the ablation
    of spec 9.4), `sections`: every method of abd_jax.methods -> its own config section (DFAD and
    DAFL read a "zskt" section, DeepInversion a "cmi" one, each with its own values), and
    `sr_steps`: per method, the SR length when +ABD switches SR on (in the method's own steps)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    if scale in ("digits", "smoke"):
        return _embedded(scale == "smoke")
    return _paper(scale)


def _embedded(smoke: bool) -> ml_collections.ConfigDict:
    import importlib

    from experiments.configs import quickstart

    arg = "smoke" if smoke else None
    c = quickstart.get_config(arg)
    quickstart.add_abd_settings(c, smoke)
    # Every other method's settings from its own config file (experiments/configs/<method>.py).
    method_cfgs = {m: importlib.import_module(f"experiments.configs.{m}").get_config(arg) for m in _OTHERS}
    c.sections = {"zskt": c.zskt, **{m: mc[_section(m)] for m, mc in method_cfgs.items()}}
    c.sr_steps = {"zskt": c.zskt.sr_pseudo_batches, **{m: mc.abd.sr_steps for m, mc in method_cfgs.items()}}
    return c


def _paper(scale: str) -> ml_collections.ConfigDict:
    from experiments.configs.common import base_config, data_config

    gtsrb = scale == "gtsrb"
    c = base_config("table", smoke=False)
    c.data = data_config(scale, image_size=32)
    c.teacher.epochs = 200  # spec 8; WRN-16-2, SGD 0.1, wd 5e-4, cosine
    c.teacher.eval_every = 10
    if gtsrb:
        # Spec 8: target 1, batch 256. The checkpoint's folder name says "adam-lr0.1"; Adam at lr 0.1
        # is far outside where Adam trains a WRN, so we keep the CIFAR-10 SGD recipe (a deliberate
        # departure; set --config.teacher.optimizer=adam to follow the name).
        c.attack.target = 1
        c.teacher.batch_size = 256
    c.checkpoint_every = 2000
    # ZSKT (spec 6.1, 4.2): 80,000 pseudo-batches on CIFAR-10 (SR resumed for the last 601; the
    # CIFAR-10 sweep has no vaccine verification) and 10,000 on GTSRB (the last 201; P = 50).
    c.zskt = zskt_config(pseudo_batches=10_000 if gtsrb else 80_000)
    c.zskt.eval_every = 500
    c.zskt.sr_pseudo_batches = 201 if gtsrb else 601
    c.zskt.sv_verify_after = 50 if gtsrb else 0
    c.clean_kd = clean_kd_config()
    # The other methods at their spec/upstream defaults (the dataclasses' defaults, DFAD/DAFL's
    # upstream hyper-parameters on the ZSKT pseudo-batch, DeepInversion's weights on CMI's
    # machinery). SR over CMI's last round (400 KD steps, spec 4.2) and OOD-KD's last 1% (its
    # released sweep leaves SR off); the ZSKT family as ZSKT.
    from abd_jax.kd.generator_losses import method_defaults
    from experiments.configs.deepinversion import DEEPINVERSION

    c.sections = {"zskt": c.zskt, "cmi": dataclass_section("cmi"), "ood": dataclass_section("ood"),
                  "deepinversion": dataclass_section("deepinversion", **DEEPINVERSION)}
    for m in ("dfad", "dafl"):
        c.sections[m] = c.zskt.copy_and_resolve_references()
        c.sections[m].update(method_defaults(m))
        c.sections[m].method = m
    c.sr_steps = {"zskt": c.zskt.sr_pseudo_batches, "dfad": c.zskt.sr_pseudo_batches,
                  "dafl": c.zskt.sr_pseudo_batches, "cmi": c.sections.cmi.kd_steps,
                  "deepinversion": c.sections.deepinversion.kd_steps, "ood": max(1, c.sections.ood.steps // 100)}
    return c


_OTHERS = ("dfad", "dafl", "cmi", "deepinversion", "ood")


def _section(method: str) -> str:
    from abd_jax.methods import get_method

    return get_method(method).section

def table_config(name: str, arg: str | None, *, title: str, spec: str, columns: list[str],
                 groups: dict[str, dict], paper: dict[str, dict[str, list[float]]],
                 abd_parts: dict[str, list[str]] | None = None, note: str = "") -> ml_collections.ConfigDict:
    """A table for experiments.tables.

    `arg` is the scale (default "digits"). `columns`: the rows of one paper line ("teacher",
    "clean_kd", a method of abd_jax.methods, or "<method>+abd"). `groups`: one paper line each,
    label -> {"trigger", optional "teacher" (model), optional "dataset" ("gtsrb": run at the gtsrb
    scale when the table runs at a paper scale, skipped on the embedded data)}. `paper`: label ->
    column -> [Acc, ASR] as printed (spec 9). `abd_parts`: which ABD parts "+abd" switches on per
    method (default SV and SR)."""
    scale = arg or "digits"
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r} for table {name}; use one of {', '.join(SCALES)}")
    c = ml_collections.ConfigDict()
    c.name, c.title, c.spec, c.scale, c.note = name, title, spec, scale, note
    c.seeds = [0, 1, 2]
    c.columns = list(columns)
    c.groups = {label: {"trigger": g["trigger"], "teacher": g.get("teacher", ""), "dataset": g.get("dataset", "")}
                for label, g in groups.items()}
    c.paper = paper
    c.abd_parts = {m: ["sv", "sr"] for m in ("zskt", "cmi", "ood", "dfad", "dafl", "deepinversion")}
    c.abd_parts.update(abd_parts or {})
    return c
