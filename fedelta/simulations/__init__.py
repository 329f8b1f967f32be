"""Run federations on one machine, from Python or the CLI: Flower simulations
(:func:`simulate`), experiment grids over them (:func:`run_experiment`), reports, a
one-process loop for strategy experiments (:func:`federate`) and the centralised
baseline."""

from fedelta.config import RunConfig
from fedelta.simulations.comparison import Arm
from fedelta.simulations.experiment import (
    Experiment,
    ExperimentResult,
    Variant,
    run_experiment,
)
from fedelta.simulations.in_process import InProcessRun, federate, run_in_process
from fedelta.simulations.report import write_comparison_report, write_run_report
from fedelta.simulations.results import RunResult
from fedelta.simulations.simulate import simulate

__all__ = [
    "Arm",
    "Experiment",
    "ExperimentResult",
    "InProcessRun",
    "RunConfig",
    "RunResult",
    "Variant",
    "federate",
    "run_experiment",
    "run_in_process",
    "simulate",
    "write_comparison_report",
    "write_run_report",
]
