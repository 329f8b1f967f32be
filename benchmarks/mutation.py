"""Mutation score of the numeric and validation core, per module.

Runs mutmut (scope and test selection in pyproject.toml's ``[tool.mutmut]``: the fast
tests, ``-m "not slow"``), then reads its per-file results and writes
``benchmarks/results/mutation.md`` and ``mutation.json``: killed / survived / no tests /
timeout per module, the score, and every surviving mutant's name (``mutmut show NAME``
prints its diff). A timeout counts as killed: the mutant made the tests hang, which they
notice. Re-running continues where mutmut left off (its cache lives in ``mutants/``).

    python benchmarks/mutation.py                 # run, then write the table
    python benchmarks/mutation.py --report-only   # table from the last run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
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


def table(results: dict[str, dict[str, str]]) -> tuple[str, dict]:
    """Markdown table per module plus a total row, and the same as JSON."""
    rows, total = [], Counter()
    survivors: dict[str, list[str]] = {}
    lines = [
        "| module | mutants | killed | survived | no tests | timeout | score |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for source, statuses in results.items():
        counts = Counter(statuses.values())
        total.update(counts)
        rows.append({"module": source, **counts})
        survivors[source] = sorted(n for n, s in statuses.items() if s in UNDETECTED)
        lines.append(_row(source, counts))
    lines.append(_row("**all**", total))
    payload = {"modules": rows, "total": dict(total), "survivors": survivors}
    return "\n".join(lines) + "\n", payload


def _row(label: str, counts: Counter) -> str:
    detected = sum(counts[s] for s in DETECTED)
    judged = detected + sum(counts[s] for s in UNDETECTED)
    score = f"{100 * detected / judged:.1f}%" if judged else "n/a"
    return (
        f"| {label} | {judged} | {counts['killed']} | {counts['survived']} | "
        f"{counts['no tests']} | {counts['timeout']} | {score} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="skip `mutmut run`")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if not args.report_only:
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
        print("no mutmut results under mutants/: run without --report-only", file=sys.stderr)
        return 1
    markdown, payload = table(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    survivors = "".join(
        f"- `{name}`\n" for names in payload["survivors"].values() for name in names
    )
    (RESULTS / "mutation.md").write_text(
        "# Mutation score of the numeric and validation core\n\n"
        "`make mutation` (mutmut, the fast tests). A timeout counts as killed.\n\n"
        + markdown
        + "\n## Surviving mutants\n\n`mutmut show NAME` prints each one's diff.\n\n"
        + (survivors or "none\n")
    )
    (RESULTS / "mutation.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
