"""The benchmarks' shared harness: selection, skipping, merging and tables, with a fake run."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "harness", Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"
)
harness = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(harness)

RUNS = ["a", "b/x", "b/y"]


class FakeRun:
    """Records the entries it runs; each result counts the runs so far."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, name: str, args) -> dict:
        if name == self.fail_on:
            raise RuntimeError(f"{name} crashed")
        self.calls.append(name)
        return {"value": len(self.calls)}


def table(results: dict, args) -> str:
    return "\n".join(f"{name}={result['value']}" for name, result in results.items())


def bench(tmp_path: Path, *argv: str, run=None, **options) -> FakeRun:
    run = run or FakeRun()
    harness.main("demo", "Demo.", RUNS, run, table, directory=tmp_path, argv=argv, **options)
    return run


def stored(tmp_path: Path):
    return json.loads((tmp_path / "demo.json").read_text())


def report(tmp_path: Path) -> str:
    return (tmp_path / "demo.md").read_text()


def test_runs_every_entry_in_order_and_writes_json_and_table(tmp_path, capsys):
    run = bench(tmp_path)
    assert run.calls == RUNS
    assert stored(tmp_path) == {"a": {"value": 1}, "b/x": {"value": 2}, "b/y": {"value": 3}}
    assert report(tmp_path) == "a=1\nb/x=2\nb/y=3\n"
    assert "a=1\nb/x=2\nb/y=3\n" in capsys.readouterr().out


def test_a_finished_entry_is_stored_before_the_next_one_runs(tmp_path):
    with pytest.raises(RuntimeError, match="b/x crashed"):
        bench(tmp_path, run=FakeRun(fail_on="b/x"))
    assert stored(tmp_path) == {"a": {"value": 1}}
    assert report(tmp_path) == "a=1\n"


def test_finished_entries_are_skipped_and_redo_runs_them_again(tmp_path):
    bench(tmp_path, "--only", "b/x")
    assert bench(tmp_path).calls == ["a", "b/y"]
    assert stored(tmp_path)["b/x"] == {"value": 1}
    assert bench(tmp_path).calls == []
    assert bench(tmp_path, "--redo", "--only", "b/x").calls == ["b/x"]
    assert list(stored(tmp_path)) == ["b/x", "a", "b/y"]  # replaced in place
    assert report(tmp_path) == "a=1\nb/x=1\nb/y=2\n"  # the table keeps the runs' order


def test_only_takes_names_and_patterns_in_its_order_each_once(tmp_path):
    assert harness.select(RUNS, "b/*, a,b/x,") == ["b/x", "b/y", "a"]
    assert harness.select(RUNS, None) == RUNS
    assert bench(tmp_path, "--redo", "--only", "b/y,b/*").calls == ["b/y", "b/x"]


def test_only_rejects_unknown_names_and_lists_the_known_ones(tmp_path, capsys):
    run = FakeRun()
    with pytest.raises(SystemExit) as exit:
        bench(tmp_path, "--only", "a,c/*,zz", run=run)
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "unknown runs 'c/*', 'zz'; known: 'a', 'b/x', 'b/y'" in error
    assert run.calls == [] and not (tmp_path / "demo.json").exists()


def test_results_are_merged_with_what_others_stored_meanwhile(tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps({"gone": {"value": 9}, "b/y": {"value": 7}}))

    def run(name, args):
        # Another process finishes b/x while this one runs a.
        others = stored(tmp_path) | {"b/x": {"value": 8}}
        (tmp_path / "demo.json").write_text(json.dumps(others))
        return {"value": 1}

    bench(tmp_path, "--only", "a", run=run)
    assert stored(tmp_path) == {
        "gone": {"value": 9},
        "b/y": {"value": 7},
        "b/x": {"value": 8},
        "a": {"value": 1},
    }
    assert report(tmp_path) == "a=1\nb/x=8\nb/y=7\n"  # entries no run names are left out


def test_report_only_rewrites_the_table_and_runs_nothing(tmp_path, capsys):
    (tmp_path / "demo.json").write_text(json.dumps({"b/y": {"value": 2}, "a": {"value": 1}}))
    run = bench(tmp_path, "--report-only", indent=1)
    assert run.calls == []
    assert report(tmp_path) == "a=1\nb/y=2\n"
    assert capsys.readouterr().out == "a=1\nb/y=2\n"
    assert stored(tmp_path) == {"b/y": {"value": 2}, "a": {"value": 1}}


def test_report_only_takes_no_selection(tmp_path, capsys):
    for flags in (["--redo"], ["--only", "a"]):
        with pytest.raises(SystemExit):
            bench(tmp_path, "--report-only", *flags)
        assert "--report-only runs nothing" in capsys.readouterr().err


def test_report_only_without_results_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no results yet"):
        bench(tmp_path, "--report-only")
    assert not (tmp_path / "demo.md").exists()


def test_indent_is_the_json_files(tmp_path):
    bench(tmp_path, "--only", "a", indent=1)
    assert (tmp_path / "demo.json").read_text() == '{\n "a": {\n  "value": 1\n }\n}\n'


def test_records_key_stores_a_list_of_records(tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps([{"steps": 25, "s": 0.5}]))

    def run(name, args):
        return {"steps": int(name), "s": 0.1}

    def by_steps(results, args):
        return " ".join(f"{name}:{r['s']}" for name, r in results.items())

    harness.main(
        "demo",
        "Demo.",
        ["5", "25"],
        run,
        by_steps,
        records_key="steps",
        directory=tmp_path,
        argv=[],
    )
    assert stored(tmp_path) == [{"steps": 25, "s": 0.5}, {"steps": 5, "s": 0.1}]
    assert report(tmp_path) == "5:0.1 25:0.5\n"


def test_a_scripts_own_arguments_reach_run_and_table(tmp_path):
    seen = []

    def run(name, args):
        seen.append(args.rounds)
        return {"value": args.rounds}

    def add_arguments(parser):
        parser.add_argument("--rounds", type=int, default=4)

    def with_rounds(results, args):
        return f"{args.rounds} rounds: " + table(results, args)

    harness.main(
        "demo",
        "Demo.",
        RUNS,
        run,
        with_rounds,
        add_arguments=add_arguments,
        directory=tmp_path,
        argv=["--rounds", "6", "--only", "a"],
    )
    assert seen == [6]
    assert report(tmp_path) == "6 rounds: a=6\n"


def test_main_single_stores_one_result_and_reports_it(tmp_path):
    calls = []

    def run(args):
        calls.append(args)
        return {"rows": [1, 2]}

    def rows(result, args):
        return f"rows {result['rows']}"

    harness.main_single("demo", "Demo.", run, rows, directory=tmp_path, argv=[])
    assert stored(tmp_path) == {"rows": [1, 2]}
    assert report(tmp_path) == "rows [1, 2]\n"
    (tmp_path / "demo.json").write_text('{"rows": [3]}')
    harness.main_single("demo", "Demo.", run, rows, directory=tmp_path, argv=["--report-only"])
    assert len(calls) == 1
    assert report(tmp_path) == "rows [3]\n"


def test_markdown_table():
    rows = [["x", 1, 2.5]]
    assert harness.markdown_table(["name", "n", "v"], rows, align="lr") == (
        "| name | n | v |\n|---|---:|---|\n| x | 1 | 2.5 |"
    )
    assert harness.markdown_table(["a", "b"], [], spaced_rule=True) == "| a | b |\n| --- | --- |"
    with pytest.raises(ValueError):
        harness.markdown_table(["a"], [], align="c")
    with pytest.raises(ValueError):
        harness.markdown_table(["a"], [], align="lr")


def test_curve_cells_leave_out_round_zero():
    rounds = [
        {"accuracy": 0.9, "loss": 0.1},
        {"accuracy": 0.5, "loss": 0.7},
        {"accuracy": 0.6251, "loss": 0.65},
        {"accuracy": 0.55, "loss": 0.6},
    ]
    assert harness.curve_header(3) == ["r1", "r2", "r3", "best", "final loss"]
    assert harness.curve_cells(rounds) == ["0.500", "0.625", "0.550", "0.625", "0.600"]


def test_fresh_process_runs_in_another_interpreter():
    assert harness.fresh_process(os.getpid) != os.getpid()
