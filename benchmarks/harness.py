"""The command line, result files and table helpers the benchmarks share.

A benchmark script defines its runs (their names, in the order of its table), a
function that runs one of them and a function that formats its Markdown table from
the stored results, and hands them to :func:`main`, which gives it this command line:

``--only a,b``
    Run these entries only: names or shell patterns (``'sign-flip/*'``), in this
    order; an unknown name is an error that lists the known ones. Default: all.
``--redo``
    Run finished entries again; without it, an entry already stored is skipped.
``--report-only``
    Run nothing: rewrite the table from the stored results.

plus the script's own arguments. Results live in ``benchmarks/results/NAME.json``
(entry name to result); each finished entry is merged into it under a file lock,
so several processes may fill the same file, and the table ``NAME.md`` is rewritten
at once, from the file as stored: an interrupted benchmark loses only the entry in
progress, and ``--report-only`` reproduces exactly what the runs wrote. An entry
counts as finished whatever arguments it ran with: after changing a script's own
arguments (``--rounds``, say), ``--redo`` runs its entries again.

A benchmark that is one indivisible run (a pipeline of dependent steps, an external
tool) uses :func:`main_single` instead: its JSON is that run's result, and only
``--report-only`` is added to its own arguments.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import multiprocessing
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock

RESULTS = Path(__file__).resolve().parent / "results"
"""Where every benchmark keeps its ``NAME.json`` and ``NAME.md``."""

T = TypeVar("T")
Run = Callable[[str, argparse.Namespace], Any]
"""Runs one named entry with the parsed command line; returns its JSON-serialisable result."""
Table = Callable[[Any, argparse.Namespace], str]
"""Formats the Markdown report (no trailing newline) from the stored results."""
Arguments = Callable[[argparse.ArgumentParser], None]
"""Adds a script's own arguments to the parser."""


class ResultFiles:
    """A benchmark's ``NAME.json`` and ``NAME.md``, written under one file lock.

    Parameters
    ----------
    name : str
        The benchmark's name: the stem of both files.
    directory : Path
        Where the files live (created on the first write).
    indent : int
        ``json.dumps`` indentation of the JSON file.
    """

    def __init__(self, name: str, directory: Path = RESULTS, indent: int = 2) -> None:
        self.json = directory / f"{name}.json"
        self.markdown = directory / f"{name}.md"
        self.indent = indent
        self._lock = FileLock(f"{self.json}.lock")

    def lock(self) -> FileLock:
        """The lock every read-modify-write of the files holds."""
        self.json.parent.mkdir(parents=True, exist_ok=True)
        return self._lock

    def read(self, default: Any = None) -> Any:
        """The stored JSON, or ``default`` if there is none yet."""
        return json.loads(self.json.read_text()) if self.json.is_file() else default

    def stored(self) -> Any:
        """The stored JSON; exits with a message if there is none yet."""
        if not self.json.is_file():
            raise SystemExit(f"{self.json}: no results yet; run the benchmark first")
        return self.read()

    def write(self, data: Any) -> None:
        """Replace the JSON with ``data``."""
        _replace(self.json, json.dumps(data, indent=self.indent) + "\n")

    def write_table(self, text: str) -> None:
        """Replace the Markdown report with ``text`` (one newline is appended)."""
        _replace(self.markdown, text + "\n")


def _replace(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file: an interruption leaves the old file whole."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def select(runs: Sequence[str], only: str | None) -> list[str]:
    """The entries ``--only`` picks, in its order, each once.

    Parameters
    ----------
    runs : sequence of str
        Every entry of the benchmark, in table order.
    only : str or None
        Comma-separated names or shell patterns (``fnmatch``); None picks all.

    Returns
    -------
    list of str
        The picked entries; a pattern's matches come in ``runs`` order.

    Raises
    ------
    ValueError
        If a name or pattern matches no entry; the message lists the known ones.
    """
    if only is None:
        return list(runs)
    picked: list[str] = []
    unknown: list[str] = []
    for pattern in filter(None, (p.strip() for p in only.split(","))):
        matched = [name for name in runs if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            unknown.append(pattern)
        picked += [name for name in matched if name not in picked]
    if unknown:
        known = ", ".join(repr(name) for name in runs)
        raise ValueError(f"unknown runs {', '.join(map(repr, unknown))}; known: {known}")
    return picked


def _parser(
    doc: str, add_arguments: Arguments | None, runs: Sequence[str] | None = None
) -> argparse.ArgumentParser:
    """The shared flags (``--only`` and ``--redo`` if there are named ``runs``), then the
    script's own."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if runs is not None:
        parser.add_argument(
            "--only",
            metavar="NAMES",
            help="comma-separated entries to run, names or shell patterns (default: all): "
            + ", ".join(map(repr, runs)),
        )
        parser.add_argument("--redo", action="store_true", help="run finished entries again")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rewrite the table from the stored JSON",
    )
    if add_arguments is not None:
        add_arguments(parser)
    return parser


def main(
    name: str,
    doc: str,
    runs: Iterable[str],
    run: Run,
    table: Table,
    *,
    add_arguments: Arguments | None = None,
    indent: int = 2,
    records_key: str | None = None,
    directory: Path = RESULTS,
    argv: Sequence[str] | None = None,
) -> None:
    """Parse the command line, run the picked entries, keep the results and the table.

    Parameters
    ----------
    name : str
        The benchmark's name: results go to ``NAME.json`` and ``NAME.md``.
    doc : str
        The script's docstring, shown by ``--help``.
    runs : iterable of str
        Every entry's name, in the order of the table.
    run : callable
        ``run(name, args)`` runs one entry and returns its JSON-serialisable result.
    table : callable
        ``table(results, args)`` formats the Markdown report from the stored
        results: a dict of entry name to result, in ``runs`` order (stored entries
        that ``runs`` no longer names are kept in the JSON but left out).
    add_arguments : callable, optional
        ``add_arguments(parser)`` adds the script's own arguments; ``args`` carries
        their values to ``run`` and ``table``.
    indent : int
        ``json.dumps`` indentation of the JSON file.
    records_key : str, optional
        Store the results as a JSON list of records, each naming its entry in this
        field (its value as a string is the entry's name), instead of an object
        keyed by entry name.
    directory : Path
        Where the result files live.
    argv : sequence of str, optional
        The arguments to parse instead of ``sys.argv[1:]``.
    """
    runs = list(runs)
    parser = _parser(doc, add_arguments, runs)
    args = parser.parse_args(argv)
    if args.report_only and (args.only is not None or args.redo):
        parser.error("--report-only runs nothing: it takes neither --only nor --redo")
    try:
        names = select(runs, args.only)
    except ValueError as error:
        parser.error(str(error))
    files = ResultFiles(name, directory, indent)

    def entries(data: Any) -> dict[str, Any]:
        return {str(r[records_key]): r for r in data} if records_key else data

    def report() -> str:
        """The table of what is stored now, written to NAME.md."""
        results = entries(files.stored())
        text = table({n: results[n] for n in runs if n in results}, args)
        files.write_table(text)
        return text

    empty: Any = [] if records_key else {}
    for entry in [] if args.report_only else names:
        if entry in entries(files.read(empty)) and not args.redo:
            print(f"{entry}: finished earlier, skipped (--redo runs it again)", flush=True)
            continue
        started = time.monotonic()
        result = run(entry, args)
        with files.lock():
            results = entries(files.read(empty))
            results[entry] = result
            files.write(list(results.values()) if records_key else results)
            report()
        print(f"{entry}: finished in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    with files.lock():
        text = report()
    print(text)


def main_single(
    name: str,
    doc: str,
    run: Callable[[argparse.Namespace], Any],
    table: Table,
    *,
    add_arguments: Arguments | None = None,
    indent: int = 2,
    directory: Path = RESULTS,
    argv: Sequence[str] | None = None,
) -> None:
    """Parse the command line of a one-run benchmark, run it, keep its result and table.

    Parameters
    ----------
    name : str
        The benchmark's name: results go to ``NAME.json`` and ``NAME.md``.
    doc : str
        The script's docstring, shown by ``--help``.
    run : callable
        ``run(args)`` runs the whole benchmark and returns its JSON-serialisable
        result: the content of ``NAME.json``.
    table : callable
        ``table(result, args)`` formats the Markdown report from the stored result.
    add_arguments : callable, optional
        ``add_arguments(parser)`` adds the script's own arguments.
    indent : int
        ``json.dumps`` indentation of the JSON file.
    directory : Path
        Where the result files live.
    argv : sequence of str, optional
        The arguments to parse instead of ``sys.argv[1:]``.
    """
    args = _parser(doc, add_arguments).parse_args(argv)
    files = ResultFiles(name, directory, indent)
    if not args.report_only:
        result = run(args)
        with files.lock():
            files.write(result)
    with files.lock():
        text = table(files.stored(), args)
        files.write_table(text)
    print(text)


def markdown_table(
    header: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    align: str = "",
    spaced_rule: bool = False,
) -> str:
    """A Markdown table: the header, the rule under it, then the rows.

    Parameters
    ----------
    header : sequence of str
        The column names.
    rows : iterable of sequences
        The cells of each row (``str()`` of each).
    align : str
        One letter a column from the left, ``l`` (rule ``---``) or ``r`` (``---:``);
        columns it does not reach are ``l``.
    spaced_rule : bool
        Write the rule like a row (``| --- | --- |``) instead of ``|---|---|``.

    Returns
    -------
    str
        The table's lines, without a trailing newline.
    """
    if len(align) > len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r}: one of 'l' or 'r' for each of {len(header)} columns")
    rule = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    lines = [_row(header), _row(rule) if spaced_rule else "|" + "|".join(rule) + "|"]
    lines += [_row(cells) for cells in rows]
    return "\n".join(lines)


def _row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def curve_header(rounds: int) -> list[str]:
    """Column names of :func:`curve_cells`: ``r1`` to ``rN``, ``best``, ``final loss``."""
    return [*(f"r{i}" for i in range(1, rounds + 1)), "best", "final loss"]


def curve_cells(rounds: Sequence[Mapping[str, float]]) -> list[str]:
    """Test accuracy after each trained round, the best of them and the final test loss.

    Parameters
    ----------
    rounds : sequence of mappings
        One ``{"accuracy": ..., "loss": ...}`` per round, round 0 (before
        training) first; it is left out.
    """
    accuracies = [r["accuracy"] for r in rounds[1:]]
    best, loss = max(accuracies), rounds[-1]["loss"]
    return [*(f"{a:.3f}" for a in accuracies), f"{best:.3f}", f"{loss:.3f}"]


def fresh_process(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a new Python interpreter, for a measurement nothing before it
    has warmed up or filled.

    Parameters
    ----------
    function : callable
        A module-level function (a benchmark script's own ones included: the new
        interpreter imports the script as ``multiprocessing``'s spawn does).
    *args
        Its arguments, pickled.

    Returns
    -------
    object
        What it returns, pickled back; an exception it raises is raised here.
    """
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(function, *args).result()
