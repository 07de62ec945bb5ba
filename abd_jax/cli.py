"""Command-line entry: `python -m abd_jax.cli --config experiments/configs/NAME.py[:smoke] --workdir DIR`.

Any config field can be overridden, e.g. `--config.attack.trigger=blend --config.seed=1`.
`--resume` continues an interrupted run from WORKDIR/checkpoints; SIGTERM (a preempted job)
writes a checkpoint at the next step and exits with status 143.
"""

from __future__ import annotations


from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiments/configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, plots and checkpoints.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue the interrupted run in WORKDIR/checkpoints.")
_DEVICES = flags.DEFINE_string(
    "devices", "1", "Data parallelism: '1' (no mesh), 'all', or N (the first N devices). Batch sizes "
    "must be multiples of it; see README 'Running on many devices'.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host; with no other flags "
    "it auto-detects SLURM / Open MPI / Cloud TPU).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")


def mesh_from_flag(devices: str):
    """The `--devices` flag as a mesh: None for '1' (the single-device path), else a 1-D data mesh."""
    from abd_jax.parallel import data_mesh

    if devices == "1":
        return None
    if devices == "all":
        return data_mesh()
    if not devices.isdigit() or int(devices) < 1:
        raise ValueError(f"--devices must be 1, all or a positive count, got {devices!r}")
    return data_mesh(int(devices))


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    if _DISTRIBUTED.value:  # before anything else touches the devices
        import jax

        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    from abd_jax.jobs import run_job
    from abd_jax.resume import run_preemptible

    run_preemptible(lambda: run_job(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value,
                                    mesh=mesh_from_flag(_DEVICES.value)))


def run() -> None:
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
