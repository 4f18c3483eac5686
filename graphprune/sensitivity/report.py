"""The sensitivity report as a text table and as an HTML page that shows the plot beside the table."""

from __future__ import annotations

import base64
import html
from typing import List, Optional

__all__ = ["format_table", "format_html", "table_rows"]


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0%}"


def table_rows(report: dict) -> List[List[str]]:
    """Header then one row per unit: damage at each ratio, and what the highest ratio keeps of the
    original's MACs, params and latency."""
    ratios = report["ratios"][1:]
    top = ratios[-1]
    header = ["unit", "kind", "ch"] + [f"damage@{r:g}" for r in ratios] + [f"MACs@{top:g}", f"params@{top:g}",
                                                                             f"latency@{top:g}"]
    rows = [header]
    original = report["original"]
    for unit in report["units"]:
        last = unit["entries"][-1]
        macs = last["macs"] / original["macs"] if original.get("macs") and last.get("macs") is not None else None
        params = last["params"] / original["params"] if original.get("params") else None
        rows.append([unit["name"], unit["kind"], str(unit["channels"])]
                    + [f"{e['damage']:.4g}" for e in unit["entries"][1:]]
                    + [_pct(macs), _pct(params), _pct(last.get("latency_fraction"))])
    return rows


def format_table(report: dict) -> str:
    """Aligned text table (what the command prints), with a line on what was measured."""
    rows = table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    original = report["original"]
    macs = f"{original['macs']:,}" if original.get("macs") is not None else "unknown"
    lines.append(f"damage = {report['metric']} on {report['samples']} samples, each unit pruned alone "
                 f"(criterion {report['criterion']}); MACs/params/latency: fraction of the original kept "
                 f"(original: {macs} MACs, {original['params']:,} params)")
    if report.get("blocked"):
        lines.append(f"{len(report['blocked'])} group(s) blocked by the analysis (graphprune inspect MODEL --groups)")
    return "\n".join(lines)


def format_html(report: dict, png: Optional[bytes], title: str = "graphprune sensitivity") -> str:
    """One self-contained page: the plot (embedded PNG) beside the table, then how it was measured."""
    rows = table_rows(report)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    figure = (f'<img alt="damage by ratio" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
              if png else "<p>(plot skipped: matplotlib is not installed; pip install 'graphprune[plot]')</p>")
    note = html.escape(format_table(report).splitlines()[-1])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.side {{ display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }}
.side img {{ max-width: 640px; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }}
td:first-child, td:nth-child(2) {{ text-align: left; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{note}</p>
<div class="side">
<div>{figure}</div>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
</div>
</body></html>
"""
