"""The method registry (abd_jax/methods.py), the method configs, and the method x (vanilla, +ABD)
sections the table runner gives each method (experiments/configs/tables/base.py)."""

import importlib

import pytest

from abd_jax.methods import METHODS, method_config, with_abd


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arg", ["smoke", None])
def test_every_method_has_a_config_that_builds_its_typed_config(method, arg):
    cfg = importlib.import_module(f"experiments.configs.{method}").get_config(arg)
    assert cfg.job == method
    section = METHODS[method].section
    typed = method_config(method, cfg[section])
    for k, v in METHODS[method].fixed.items():  # e.g. DFAD's config really runs DFAD
        assert getattr(typed, k) == v
    assert not typed.sv and getattr(typed, METHODS[method].sr_field) == 0  # the config as written is vanilla
    abd = with_abd(method, typed, sr_steps=cfg.abd.sr_steps)
    assert abd.sv and getattr(abd, METHODS[method].sr_field) == cfg.abd.sr_steps > 0
    # The table runner (experiments.tables, experiments.methods) gives every row the method's own
    # section and the quickstart's teacher, so one saved teacher serves all rows.
    from experiments.configs.quickstart import get_config as quickstart_config
    from experiments.configs.tables.base import job_config

    job = job_config("smoke" if arg else "digits")
    assert job.teacher == quickstart_config(arg).teacher
    if method != "zskt":  # the tables' ZSKT section carries the quickstart's --abd settings
        assert job.sections[method] == cfg[section]
        assert job.sr_steps[method] == cfg.abd.sr_steps


def test_unknown_method_field_and_abd_part_name_the_fix():
    with pytest.raises(ValueError, match="unknown cmi fields"):
        method_config("cmi", {"roundz": 3})
    with pytest.raises(ValueError, match="unknown data-free KD method"):
        method_config("cmi2", {})
    cfg = method_config("ood", {"sr_steps": 5})
    with pytest.raises(ValueError, match="unknown ABD parts"):
        with_abd("ood", cfg, ("sv", "vaccine"))
    with pytest.raises(ValueError, match="positive ood.sr_steps"):
        with_abd("ood", method_config("ood", {}), ("sr",))
    van = with_abd("ood", cfg, ())
    assert not van.sv and van.sr_steps == 0


def test_fixed_settings_win_over_the_section():
    # A "dfad" job is DFAD even when its section says otherwise.
    assert method_config("dfad", {"method": "zskt"}).method == "dfad"
