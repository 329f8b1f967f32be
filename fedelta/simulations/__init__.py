"""Run federations on one machine: simulations and the centralised baseline."""

from fedelta.simulations.simulate import SimulationResult, simulate

__all__ = ["SimulationResult", "simulate"]
