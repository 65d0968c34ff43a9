"""Rendering report tables: markdown, LaTeX and HTML for reading (percent, one decimal), CSV for
further analysis (one tidy table of the raw fractions)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from tabulate import tabulate

from clipbench.errors import ClipbenchError
from clipbench.lazy import pandas as pd

FORMATS = ("markdown", "csv", "latex", "html")
#: appended to a value computed with unreadable images skipped (``--on-bad-image skip``)
SKIPPED_MARK = "†"
#: appended to a value compared across protocols (e.g. a different metric than the reference's)
CROSS_PROTOCOL_MARK = "‡"


@dataclass
class ReportTable:
    """One table of the report.

    `frame` has label columns `model` and `row`, then value columns. Columns in `percent_columns`
    hold fractions (rendered as percent, one decimal; rows named `diff ...` with a sign);
    `ci_low`/`ci_high`/`std` (same shape as `frame`, or None) hold the matching interval bounds and
    standard deviations. Other value columns are rendered as they are (counts, shots per class).
    `marked` (same shape, or None): cells flagged with :data:`SKIPPED_MARK` (a value computed with
    unreadable images left out; a note says how many). `cross_protocol` (same shape, or None): cells
    flagged with :data:`CROSS_PROTOCOL_MARK` (compared with a reference measured differently; a note
    says how).
    """

    title: str
    task: str
    frame: pd.DataFrame
    percent_columns: list[str]
    notes: list[str] = field(default_factory=list)
    ci_low: pd.DataFrame | None = None
    ci_high: pd.DataFrame | None = None
    std: pd.DataFrame | None = None
    marked: pd.DataFrame | None = None
    cross_protocol: pd.DataFrame | None = None


def check_format(fmt: str) -> None:
    """Refuse a report format other than `FORMATS`."""
    if fmt not in FORMATS:
        raise ClipbenchError(f"Unknown report format {fmt!r}; use one of {', '.join(FORMATS)}.")


def format_cell(value: Any, row: str, percent: bool, low: Any = None, high: Any = None, std: Any = None) -> str:
    """One value as displayed: percent, one decimal (signed in `diff` rows), then ± std and [low, high]."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not percent:
        return f"{value:.1f}" if isinstance(value, float) else str(value)
    text = f"{100 * value:+.1f}" if row.startswith("diff") else f"{100 * value:.1f}"
    if std is not None and pd.notna(std):
        text += f" ± {100 * std:.1f}"
    if low is not None and high is not None and pd.notna(low) and pd.notna(high):
        text += f" [{100 * low:.1f}, {100 * high:.1f}]"
    return text


def _display_rows(table: ReportTable) -> list[list[str]]:
    rows = []
    for i, record in table.frame.iterrows():
        cells = [str(record["model"]), str(record["row"])]
        for column in table.frame.columns[2:]:
            extra = {
                name: getattr(table, name).at[i, column]
                for name in ("ci_low", "ci_high", "std")
                if getattr(table, name) is not None and column in getattr(table, name).columns
            }
            text = format_cell(record[column], str(record["row"]), column in table.percent_columns,
                               extra.get("ci_low"), extra.get("ci_high"), extra.get("std"))
            for flags, mark in ((table.marked, SKIPPED_MARK), (table.cross_protocol, CROSS_PROTOCOL_MARK)):
                if text and _flag(flags, i, column):
                    text += f" {mark}"
            cells.append(text)
        rows.append(cells)
    return rows


def _flag(flags: pd.DataFrame | None, i: Any, column: str) -> bool:
    """Whether cell (i, column) is flagged in ``flags`` (``ReportTable.marked`` / ``cross_protocol``)."""
    flagged = flags is not None and column in flags.columns and flags.at[i, column]
    return bool(pd.notna(flagged) and flagged)


def _tidy(tables: Sequence[ReportTable]) -> pd.DataFrame:
    """All tables as one long frame: one row per table × model × row × column, raw values, and the
    marks of the other formats as flags: ``skipped`` (†: unreadable images left out) and
    ``cross_protocol`` (‡: compared with a value measured under another metric)."""
    columns = ["table", "task", "model", "row", "column", "value", "ci_low", "ci_high", "std", "skipped",
               "cross_protocol"]
    parts = []
    for table in tables:
        rows = []
        for i, record in table.frame.iterrows():
            for column in table.frame.columns[2:]:
                if pd.isna(record[column]):
                    continue
                extra = {name: getattr(table, name).at[i, column] if getattr(table, name) is not None else math.nan
                         for name in ("ci_low", "ci_high", "std")}
                rows.append({"table": table.title, "task": table.task, "model": record["model"], "row": record["row"],
                             "column": column, "value": record[column], **extra,
                             "skipped": _flag(table.marked, i, column),
                             "cross_protocol": _flag(table.cross_protocol, i, column)})
        parts.append(pd.DataFrame(rows, columns=columns))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def render_tables(tables: Sequence[ReportTable], fmt: str = "markdown") -> str:
    """Render tables as markdown, LaTeX or HTML (percent, one decimal) or CSV (one tidy table, fractions)."""
    check_format(fmt)
    if fmt == "csv":
        # 10 significant digits: exact for recorded values, hides binary noise of percent / 100
        return _tidy(tables).to_csv(index=False, float_format="%.10g")
    tablefmt = {"markdown": "github", "latex": "latex_booktabs", "html": "html"}[fmt]
    parts = []
    for table in tables:
        body = tabulate(_display_rows(table), headers=list(table.frame.columns), tablefmt=tablefmt,
                        disable_numparse=True)
        notes = " ".join(table.notes)
        if fmt == "markdown":
            parts.append(f"## {table.title}\n\n{body}\n\n{notes}\n")
        elif fmt == "latex":
            parts.append(f"% {table.title}: {notes}\n{body}\n")
        else:
            parts.append(f"<h2>{table.title}</h2>\n{body}\n<p>{notes}</p>\n")
    return "\n".join(parts)
