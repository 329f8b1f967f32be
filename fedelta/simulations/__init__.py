"""Run federations on one machine: Flower simulations, a one-process loop for strategy
experiments, and the centralised baseline."""

from fedelta.simulations.in_process import InProcessRun, federate
from fedelta.simulations.simulate import SimulationResult, simulate

__all__ = ["InProcessRun", "SimulationResult", "federate", "simulate"]
