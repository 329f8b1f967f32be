"""PNG plots of runs and comparisons: quality and loss per round, bytes per round,
quality against total uplink bytes, client drift per round, and epsilon per round
when a run is private.

Each arm is one line (the mean over its seeds) with a shaded band from the lowest
to the highest seed. Matplotlib's object API only: no pyplot state, no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator

from fedelta.simulations.comparison import Arm

MB = 1e6


def write_plots(arms: Sequence[Arm], out_dir: Path) -> list[Path]:
    """Write the plots for ``arms`` into ``out_dir``; returns their paths in reading order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    causal = any(arm.causal for arm in arms)
    quality, label = (
        ("test-perplexity", "test perplexity") if causal else ("test-accuracy", "test accuracy")
    )
    paths = [
        _quality_and_loss(arms, quality, label, out_dir / "quality.png"),
        _bytes(arms, out_dir / "bytes.png"),
        _quality_vs_uplink(arms, quality, label, out_dir / "quality_vs_uplink.png"),
    ]
    if any(len(per_round(arm, "update-cosine-mean")[0]) for arm in arms):
        paths.append(_drift(arms, out_dir / "drift.png"))
    if any(arm.private for arm in arms):
        paths.append(_epsilon(arms, out_dir / "epsilon.png"))
    return paths


def per_round(arm: Arm, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rounds where ``key`` was measured, and its mean, min and max over the arm's seeds."""
    by_round: dict[int, list[float]] = {}
    for result in arm.results:
        for row in result.rows:
            if row.get(key) is not None:
                by_round.setdefault(row["round"], []).append(float(row[key]))
    rounds = np.array(sorted(by_round), dtype=int)
    values = [by_round[r] for r in rounds]
    return (
        rounds,
        np.array([np.mean(v) for v in values]),
        np.array([np.min(v) for v in values]),
        np.array([np.max(v) for v in values]),
    )


def cumulative_uplink(arm: Arm) -> tuple[np.ndarray, np.ndarray]:
    """Rounds and the mean over seeds of the uplink bytes sent up to and including each."""
    totals: dict[int, list[float]] = {}
    for result in arm.results:
        sent = 0.0
        for row in result.rows:
            sent += row.get("bytes-up", 0)
            totals.setdefault(row["round"], []).append(sent)
    rounds = np.array(sorted(totals), dtype=int)
    return rounds, np.array([np.mean(totals[r]) for r in rounds])


def _line(ax: Axes, arm: Arm, key: str, scale: float = 1.0, **style: object) -> None:
    rounds, mean, low, high = per_round(arm, key)
    if not len(rounds):
        return
    (line,) = ax.plot(rounds, mean / scale, marker="o", markersize=3, **style)
    if len(arm.results) > 1:
        ax.fill_between(rounds, low / scale, high / scale, color=line.get_color(), alpha=0.2)


def _finish(fig: Figure, axes: Sequence[Axes], path: Path) -> Path:
    for ax in axes:
        ax.grid(True, alpha=0.3)
        fixed = isinstance(ax.xaxis.get_major_locator(), FixedLocator)
        if ax.get_xlabel() == "round" and not fixed:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _quality_and_loss(arms: Sequence[Arm], key: str, label: str, path: Path) -> Path:
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for index, arm in enumerate(arms):
        color = f"C{index % 10}"
        _line(left, arm, key, color=color, label=arm.label)
        _line(right, arm, "test-loss", color=color, label=f"{arm.label} (test)")
        _line(right, arm, "train-loss", color=color, linestyle="--", label=f"{arm.label} (train)")
    left.set(xlabel="round", ylabel=label, title=f"{label} per round")
    right.set(xlabel="round", ylabel="loss", title="loss per round (dashed: clients' training)")
    if key == "test-perplexity":
        left.set_yscale("log")
    return _finish(fig, (left, right), path)


def _bytes(arms: Sequence[Arm], path: Path) -> Path:
    """Grouped bars: one per arm and round, uplink and downlink side by side."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(arms), 1)
    for ax, key, title in zip(
        axes, ("bytes-up", "bytes-down"), ("uplink", "downlink"), strict=True
    ):
        ticks: set[int] = set()
        for index, arm in enumerate(arms):
            rounds, mean, low, high = per_round(arm, key)
            trained = rounds > 0
            ticks.update(int(r) for r in rounds[trained])
            ax.bar(
                rounds[trained] + (index - (len(arms) - 1) / 2) * width,
                mean[trained] / MB,
                width,
                yerr=np.vstack([mean - low, high - mean])[:, trained] / MB
                if len(arm.results) > 1
                else None,
                color=f"C{index % 10}",
                label=arm.label,
            )
        ax.set(xlabel="round", ylabel="MB", title=f"{title} per round (all sites)")
        ax.set_xticks(sorted(ticks))
    return _finish(fig, axes, path)


def _quality_vs_uplink(arms: Sequence[Arm], key: str, label: str, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for index, arm in enumerate(arms):
        rounds, sent = cumulative_uplink(arm)
        measured, mean, _, _ = per_round(arm, key)
        at = {int(r): s for r, s in zip(rounds, sent, strict=True)}
        ax.plot(
            [at[int(r)] / MB for r in measured],
            mean,
            marker="o",
            markersize=3,
            color=f"C{index % 10}",
            label=arm.label,
        )
    ax.set(
        xlabel="total uplink MB (all sites, cumulative)",
        ylabel=label,
        title=f"{label} against uplink bytes",
    )
    if key == "test-perplexity":
        ax.set_yscale("log")
    return _finish(fig, [ax], path)


def _drift(arms: Sequence[Arm], path: Path) -> Path:
    """How far the sites' updates agree with the global change, and how large they are."""
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for index, arm in enumerate(arms):
        color = f"C{index % 10}"
        _line(left, arm, "update-cosine-mean", color=color, label=arm.label)
        _line(right, arm, "update-norm-mean", color=color, label=arm.label)
    left.set(
        xlabel="round",
        ylabel="cosine",
        title="site update vs global change (mean over sites)",
    )
    right.set(xlabel="round", ylabel="L2 norm", title="site update norm (mean over sites)")
    return _finish(fig, (left, right), path)


def _epsilon(arms: Sequence[Arm], path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for index, arm in enumerate(arms):
        color = f"C{index % 10}"
        _line(ax, arm, "dp-epsilon", color=color, label=f"{arm.label} (DP-SGD, largest site)")
        _line(
            ax,
            arm,
            "client-dp-epsilon",
            color=color,
            linestyle="--",
            label=f"{arm.label} (client-level)",
        )
    ax.set(xlabel="round", ylabel="epsilon", title="privacy spent (epsilon) per round")
    ax.set_ylim(bottom=0)
    return _finish(fig, [ax], path)
