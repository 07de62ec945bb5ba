"""`--set path.to.field=value` on an ml_collections job config: the command-line override shared by
the table runner (`experiments.tables`, `experiments.methods`) and the quickstart scripts; and
`FIELD=VALUE` lists for a typed dataclass config (`experiments.sr_sweep --variants`,
`benchmarks.suite --zskt`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def parse_like(old, raw: str, what: str, flag: str = "--set"):
    """`raw` as a value of `old`'s type (bool, int, float or str); errors name `flag` and `what`."""
    if isinstance(old, bool):
        if raw.lower() not in ("true", "false"):
            raise ValueError(f"{flag} {what}={raw}: {what} is a bool; write True or False")
        return raw.lower() == "true"
    if isinstance(old, (int, float, str)):
        try:
            return type(old)(raw)
        except ValueError:
            raise ValueError(f"{flag} {what}={raw}: not a valid {type(old).__name__} for {what}") from None
    raise ValueError(f"{flag} {what}: a {type(old).__name__} field cannot be set from the command line; "
                     "write a table config instead")


def parse_fields(items: Sequence[str], cls, flag: str, *, prefix: str = "") -> dict:
    """["field=value", ...] -> {field: value} for the dataclass `cls` (e.g. ZSKTConfig), each value
    parsed as its field's type (`parse_like`). A name that is not a field is tried with `prefix`
    ("rounds" -> "sr_rounds"); an unknown name or a bad value raises a ValueError naming `flag`."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    out = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{flag} {item!r}: write FIELD=VALUE")
        if name not in defaults:
            name = prefix + name
        if name not in defaults:
            raise ValueError(f"{flag} {item!r}: {cls.__name__} has no field {name!r}")
        out[name] = parse_like(defaults[name], raw, name, flag=flag)
    return out


def apply_overrides(cfg, overrides: Sequence[str]) -> None:
    """`--set path.to.field=value` on one line's job config, in place (e.g.
    `sections.ood.sv_push_cap=uniform`). The value takes the type of the field it replaces; a
    changed field changes the row keys, so such rows go to their own --workdir."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--set {item!r}: write path.to.field=value, e.g. sections.ood.sv_push_cap=uniform")
        *parents, field = path.split(".")
        node = cfg
        for i, name in enumerate(parents):
            if name not in node:
                raise ValueError(f"--set {path}: the job config has no {'.'.join(parents[:i + 1])!r}; "
                                 f"it has: {', '.join(sorted(node.keys()))}")
            node = node[name]
        if field not in node:
            raise ValueError(f"--set {path}: no field {field!r} there; it has: {', '.join(sorted(node.keys()))}")
        node[field] = parse_like(node[field], raw, path)
