"""Command-line entry: `python -m abd_jax.cli --config experiments/configs/NAME.py[:smoke] --workdir DIR`.

Any config field can be overridden, e.g. `--config.attack.trigger=blend --config.seed=1`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiments/configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, plots and checkpoints.")


def main(argv: list[str]) -> None:
    del argv
    from abd_jax.jobs import run_job

    run_job(_CONFIG.value, _WORKDIR.value)


def run() -> None:
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
