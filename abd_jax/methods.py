"""The data-free KD methods by name, and what "+ABD" switches on in each (issue 5).

One registry so the CLI jobs, the method-comparison command and the table runner treat every
method alike: each entry names the config section it reads (`cfg.zskt`, `cfg.cmi`, `cfg.ood`), the
typed config class that section becomes, the fixed settings that make the method (DFAD and DAFL
are generator losses of the ZSKT pseudo-batch; DeepInversion is a synthesizer of CMI's inversion
machinery), and the `distill_*` function. Imports are lazy: importing this module does not build
any method.

Every `distill_*` has the signature `(teacher, teacher_vars, dataset, eval_sets, cfg, *, seed, desc,
checkpoint, mesh) -> ZSKTResult` (the result class is shared: student state under
`result.state.student`, the evaluation history, seconds per step, sample images, the vaccine's
report).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any, NamedTuple


class Method(NamedTuple):
    """A data-free KD method as the jobs see it."""

    section: str  # the config section it reads, e.g. "zskt"
    config_class: str  # "module:Class" of its typed config
    distill: str  # "module:function"
    fixed: Mapping[str, Any]  # config values that define the method (e.g. {"method": "dfad"})
    sr_field: str  # the config field holding the length of the SR phase
    step_label: str  # what one history "step" is, for plots


METHODS: dict[str, Method] = {
    "zskt": Method("zskt", "abd_jax.kd.zskt_train:ZSKTConfig", "abd_jax.kd.zskt_train:distill_zskt",
                   {"method": "zskt"}, "sr_pseudo_batches", "pseudo-batch"),
    "dfad": Method("zskt", "abd_jax.kd.zskt_train:ZSKTConfig", "abd_jax.kd.zskt_train:distill_zskt",
                   {"method": "dfad"}, "sr_pseudo_batches", "pseudo-batch"),
    "dafl": Method("zskt", "abd_jax.kd.zskt_train:ZSKTConfig", "abd_jax.kd.zskt_train:distill_zskt",
                   {"method": "dafl"}, "sr_pseudo_batches", "pseudo-batch"),
    "cmi": Method("cmi", "abd_jax.kd.cmi:CMIConfig", "abd_jax.kd.cmi:distill_cmi",
                  {"synthesizer": "cmi"}, "sr_steps", "KD step"),
    "deepinversion": Method("cmi", "abd_jax.kd.cmi:CMIConfig", "abd_jax.kd.cmi:distill_cmi",
                            {"synthesizer": "deepinversion"}, "sr_steps", "KD step"),
    "ood": Method("ood", "abd_jax.kd.ood:OODConfig", "abd_jax.kd.ood:distill_ood", {}, "sr_steps", "KD step"),
}
ABD_PARTS = ("sv", "sr")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown data-free KD method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def config_class(name: str) -> type:
    """The typed config class method `name` reads (e.g. `ZSKTConfig` for "dfad")."""
    return _load(get_method(name).config_class)


def method_config(name: str, section: Mapping[str, Any]) -> Any:
    """The typed config of method `name` from its config section (a dict or ConfigDict).

    Unknown fields are an error naming the known ones (a typo must not silently fall back to a
    default); the method's fixed settings win over the section's (a "dfad" job is DFAD even if the
    section says otherwise).
    """
    m = get_method(name)
    cls = config_class(name)
    values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {m.section} fields {sorted(unknown)}; remove them from the config "
                         f"(known: {', '.join(sorted(known))})")
    fixed = {k: v for k, v in m.fixed.items() if k in known}
    return cls(**{**values, **fixed})


def with_abd(name: str, cfg: Any, parts: tuple[str, ...] = ABD_PARTS, sr_steps: int | None = None) -> Any:
    """`cfg` with the ABD parts switched on: "sv" (the vaccine: a generator / inversion penalty, or
    OOD-KD's per-sample weights, spec 3.3) and "sr" (Self-Retrospection over the last `sr_steps`
    steps, spec 4.2; default: the length already in the config). Other ABD settings (coefficients,
    verification) are the config's."""
    unknown = set(parts) - set(ABD_PARTS)
    if unknown:
        raise ValueError(f"unknown ABD parts {sorted(unknown)}; use any of: {', '.join(ABD_PARTS)}")
    m = get_method(name)
    changes: dict[str, Any] = {"sv": "sv" in parts}
    sr_len = getattr(cfg, m.sr_field) if sr_steps is None else sr_steps
    changes[m.sr_field] = sr_len if "sr" in parts else 0
    if "sr" in parts and not sr_len:
        raise ValueError(f"ABD with SR needs a positive {m.section}.{m.sr_field} (the SR phase's length)")
    return dataclasses.replace(cfg, **changes)


def distill(name: str, teacher, teacher_vars, dataset, eval_sets, cfg: Any, **kwargs: Any):
    """Runs method `name` with its typed config; `kwargs`: seed, desc, checkpoint, mesh."""
    return _load(get_method(name).distill)(teacher, teacher_vars, dataset, eval_sets, cfg, **kwargs)
