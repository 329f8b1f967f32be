"""Self-contained HTML reports: the plots (embedded as PNG), the table and the config,
one page per run and one per experiment, readable offline and easy to attach."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from fedelta.server.metrics import format_bytes, format_table
from fedelta.simulations.comparison import Arm, formatted, write_tables
from fedelta.simulations.plots import write_plots
from fedelta.simulations.results import RunResult

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.muted { color: #666; font-size: 0.9em; }
"""


def write_run_report(result: RunResult) -> Path:
    """``RUN_DIR/plots/*.png`` and ``RUN_DIR/report.html`` for one run."""
    plots = write_plots([Arm(result.name, [result])], result.run_dir / PLOTS_DIR)
    s = result.summary
    facts = [
        ("strategy", s.get("strategy", "-")),
        ("rounds", s.get("rounds")),
        (f"final {result.quality_key}", result.final_quality),
        ("uplink", format_bytes(result.bytes_up)),
        ("downlink", format_bytes(result.bytes_down)),
    ]
    if result.epsilon is not None:
        facts.append((f"epsilon (delta {result.config.privacy.delta:g})", result.epsilon))
    facts += [
        ("wall seconds", s.get("wall-seconds")),
        ("peak memory MB", s.get("peak-rss-mb", "-")),
        ("adapter", s.get("adapter")),
    ]
    if s.get("stopped-early"):
        facts.append(("stopped early", s["stopped-early"]))
    body = [
        f"<h1>Run {html.escape(result.name)}</h1>",
        _facts_table(facts),
        *(_image(p) for p in plots),
        "<h2>Per round</h2>",
        f"<pre>{html.escape(format_table(result.rows))}</pre>",
        _details("config.toml", result.config.to_toml()),
    ]
    return _write_page(result.run_dir / REPORT_FILE, f"fedelta run {result.name}", body)


def write_comparison_report(
    title: str, arms: Sequence[Arm], out_dir: Path, spec_text: str = ""
) -> Path:
    """Tables (``results.csv``, ``results.md``, ``runs.csv``), plots and ``report.html``
    comparing ``arms`` in ``out_dir``."""
    write_tables(arms, out_dir)
    plots = write_plots(arms, out_dir / PLOTS_DIR)
    seeds = sorted({len(arm.results) for arm in arms})
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='muted'>{len(arms)} arms, mean ± sample standard deviation over "
        f"{'/'.join(map(str, seeds))} seed(s); bands in the plots span the lowest to "
        "the highest seed.</p>",
        _comparison_table(arms),
        *(_image(p) for p in plots),
        "<h2>Runs</h2>",
        _run_links(arms, out_dir),
    ]
    if spec_text:
        body.append(_details("experiment", spec_text))
    return _write_page(out_dir / REPORT_FILE, title, body)


def _write_page(path: Path, title: str, body: Sequence[str]) -> Path:
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>"


def _facts_table(facts: Sequence[tuple[str, object]]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(_text(v))}</td></tr>" for k, v in facts
    )
    return f"<table>{rows}</table>"


def _text(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _comparison_table(arms: Sequence[Arm]) -> str:
    header, cells = formatted(arms)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _run_links(arms: Sequence[Arm], out_dir: Path) -> str:
    items = []
    for arm in arms:
        for result in arm.results:
            report = result.run_dir / REPORT_FILE
            try:
                href = report.relative_to(out_dir)
            except ValueError:
                href = report.resolve()
            items.append(
                f"<li>{html.escape(arm.label)}, seed {result.config.seed}: "
                f"<a href='{html.escape(str(href))}'>{html.escape(result.name)}</a></li>"
            )
    return f"<ul>{''.join(items)}</ul>"


def _details(summary: str, text: str) -> str:
    return (
        f"<details><summary>{html.escape(summary)}</summary>"
        f"<pre>{html.escape(text)}</pre></details>"
    )
