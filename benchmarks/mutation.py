"""Mutation score of the numeric and validation core, per module.

Runs mutmut (scope and test selection in pyproject.toml's ``[tool.mutmut]``: the fast
tests, ``-m "not slow"``), then reads its per-file results and writes
``benchmarks/results/mutation.md`` and ``mutation.json``: killed / survived / no tests /
timeout per module, the score, and every surviving mutant's name (``mutmut show NAME``
prints its diff). A timeout counts as killed: the mutant made the tests hang, which they
notice. Re-running continues where mutmut left off (its cache lives in ``mutants/``).

    python benchmarks/mutation.py                 # run, then write the table
    python benchmarks/mutation.py --report-only   # table from mutation.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parent.parent
DETECTED = {"killed", "timeout", "caught by type check"}
UNDETECTED = {"survived", "no tests", "suspicious", "segfault"}


def status_of(exit_code: int | None) -> str:
    """mutmut's own reading of a mutant's exit code."""
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[exit_code]


def read_results() -> dict[str, dict[str, str]]:
    """{source file: {mutant name: status}} from mutmut's result files."""
    results: dict[str, dict[str, str]] = {}
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(ROOT / "mutants"))[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if codes:
            results[source] = {name: status_of(code) for name, code in codes.items()}
    return results


def summary(results: dict[str, dict[str, str]]) -> dict:
    """Counts per status for each module and in total, and every undetected mutant."""
    modules, total = [], Counter()
    for source, statuses in results.items():
        counts = Counter(statuses.values())
        total.update(counts)
        modules.append({"module": source, **counts})
    survivors = {
        source: sorted(name for name, status in statuses.items() if status in UNDETECTED)
        for source, statuses in results.items()
    }
    return {"modules": modules, "total": dict(total), "survivors": survivors}


def run(args: argparse.Namespace) -> dict:
    """``mutmut run``, then the summary of its results."""
    # mutmut forks each mutant's test run from a warm process: one torch thread, so
    # no thread pool held across the fork deadlocks the child (a false timeout).
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HYPOTHESIS_PROFILE": "mutation",
    }
    mutmut = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
    subprocess.run(mutmut, cwd=ROOT, env=env, check=True)
    results = read_results()
    if not results:
        raise SystemExit("mutmut left no results under mutants/")
    return summary(results)


def table(result: dict, args: argparse.Namespace) -> str:
    """The score per module and in total, then the surviving mutants."""
    rows = [_row(module["module"], module) for module in result["modules"]]
    rows.append(_row("**all**", result["total"]))
    header = ["module", "mutants", "killed", "survived", "no tests", "timeout", "score"]
    survivors = [f"- `{n}`" for names in result["survivors"].values() for n in names]
    return "\n".join(
        [
            "# Mutation score of the numeric and validation core",
            "",
            "`make mutation` (mutmut, the fast tests). A timeout counts as killed.",
            "",
            harness.markdown_table(header, rows, align="lrrrrrr"),
            "",
            "## Surviving mutants",
            "",
            "`mutmut show NAME` prints each one's diff.",
            "",
            *(survivors or ["none"]),
        ]
    )


def _row(label: str, counts: Mapping[str, int]) -> list[str]:
    """A table row from the number of mutants per status (absent statuses: none)."""
    detected = sum(counts.get(s, 0) for s in DETECTED)
    judged = detected + sum(counts.get(s, 0) for s in UNDETECTED)
    score = f"{100 * detected / judged:.1f}%" if judged else "n/a"
    shown = [counts.get(s, 0) for s in ("killed", "survived", "no tests", "timeout")]
    return [label, str(judged), *map(str, shown), score]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-children",
        type=int,
        default=os.cpu_count() or 1,
        help="mutants run at once (default: %(default)s)",
    )


if __name__ == "__main__":
    harness.main_single("mutation", __doc__, run, table, add_arguments=add_arguments)
