"""The table, for the terminal and as Markdown."""

from __future__ import annotations

from bench import context, stats

HEADER = ["figure", "Strata", "reference", "ratio", "target", "result", "n"]


def _cells(row: context.Row) -> list[str]:
    strata = stats.fmt_samples(row.strata) if row.strata is not None else "—"
    if row.reference is not None:
        reference = f"{stats.fmt_samples(row.reference)} ({row.ref_label})"
    else:
        reference = row.ref_label or "—"
    ratio = f"{row.ratio:.2f}×" if row.ratio is not None else "—"
    n = str(row.n) if row.n is not None else str(len(row.strata)) if row.strata is not None \
        else ""
    return [row.figure, strata, reference, ratio, row.target, row.result, n]


def text(rows: list[context.Row]) -> str:
    table = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    out = []
    for k, line in enumerate(table):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _md(cell: str) -> str:
    return cell.replace("|", "\\|")


def markdown(rows: list[context.Row], machine: dict[str, str], notes: list[str],
             elapsed: float, command: str) -> str:
    out = ["# Strata benchmark results", ""]
    out.append(f"`{command}`, {elapsed / 60:.1f} minutes. Each figure is the median of its runs "
               "(min–max in brackets); pairs run back to back in alternating order, and a "
               "ratio is the median over blocks of two pairs, one in each order.")
    out.append("")
    for key, value in machine.items():
        out.append(f"- {key}: {value}")
    out += ["", "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    for row in rows:
        out.append("| " + " | ".join(_md(c) for c in _cells(row)) + " |")
    row_notes = [(r.figure, r.note) for r in rows if r.note]
    if row_notes or notes:
        out += ["", "## Notes", ""]
        out += [f"- {figure}: {note}" for figure, note in row_notes]
        out += [f"- {note}" for note in notes]
    return "\n".join(out) + "\n"
