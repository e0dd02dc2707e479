"""report.html: the whole report in one file that opens in a browser with no server.

The verdicts, the plots (embedded as ``data:`` URIs), the scenario table and what the run was
(versions, device, machine, command, wall time). No script, no external resource: inline CSS
only, so the file can be mailed, attached to CI or opened from disk.
"""

from __future__ import annotations

import base64
import html
import os

from bench.report import summary as report

__all__ = ["render", "write_html"]

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       margin: 0 auto; padding: 24px 32px; max-width: 1480px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 12px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
ul.verdicts { padding-left: 0; list-style: none; }
ul.verdicts li { margin: 6px 0; padding: 10px 14px; background: #f3f7fb; border-left: 4px solid #1f77b4;
                 display: flex; gap: 1em; }
ul.verdicts b { flex: 0 0 7.5em; }
ul.verdicts li.bad { background: #fdf1f1; border-left-color: #d62728; }
img.plot { display: block; max-width: 100%; height: auto; border: 1px solid #eee; margin: 6px 0 14px; }
table { border-collapse: collapse; font: 13px/1.3 ui-monospace, "DejaVu Sans Mono", Menlo, monospace; }
th, td { padding: 3px 6px; border-bottom: 1px solid #eee; white-space: nowrap; }
th { background: #fafafa; position: sticky; top: 0; text-align: left; border-bottom: 2px solid #ccc;
     white-space: normal; vertical-align: bottom; }  /* headers wrap: 16 columns fit a laptop window */
td.num, th.num { text-align: right; }
tr.group td { border-top: 2px solid #ccc; }
td.OOM { color: #b00; font-weight: bold; }
td.mode-unsharded { color: #d62728; } td.mode-sharded { color: #1f77b4; }
td.mode-naive { color: #c96200; } td.mode-keras-native { color: #2ca02c; }
td.mode-keras-jax { color: #9467bd; } td.mode-fsdp2 { color: #8c564b; }
td.error, td.timeout { color: #fff; background: #b00; }
table.meta td:first-child { color: #666; padding-right: 18px; }
table.meta td { font-family: system-ui, sans-serif; white-space: normal; }
p.note { color: #555; font-size: 13px; max-width: 1100px; }
"""


def _data_uri(path) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _table(rows) -> str:
    summary = report.summarize(rows)
    headers, body, right = report.cells(summary)
    status_col, mode_col = headers.index("status"), headers.index("mode")
    out = ["<table class='scenarios'><thead><tr>"]
    out += [f"<th class='{'num' if r else ''}'>{html.escape(h)}</th>" for h, r in zip(headers, right)]
    out.append("</tr></thead><tbody>")
    prev = None
    for s, vals in zip(summary, body):
        group = (s["family"], s["param_bytes"], bool(s["budget_bytes"]))
        out.append("<tr class='group'>" if prev is not None and group != prev else "<tr>")
        prev = group
        for i, (v, r) in enumerate(zip(vals, right)):
            cls = ["num"] if r else []
            if i == status_col:
                cls.append(html.escape(v))
            if i == mode_col:
                cls.append("mode-" + html.escape(s["mode"]))
            title = f" title='{html.escape('; '.join(s['errors']))}'" if i == status_col and s["errors"] else ""
            out.append(f"<td class='{' '.join(cls)}'{title}>{html.escape(v)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render(meta: dict, rows, plots=()) -> str:
    """The report as one HTML string (plots read from their PNG files and embedded)."""
    summary = report.summarize(rows)
    verdicts = report.verdicts(summary, meta.get("budget_bytes"))
    failed = {s["family"] + (" vs peers" if s["mode"] in report.PEER_MODES else "")
              for s in summary if s["status"] not in ("ok", "OOM")}
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             "<title>shardimpl scaling report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>shardimpl scaling report</h1>", "<ul class='verdicts'>"]
    for fam, text in verdicts.items():
        cls = " class='bad'" if fam in failed else ""
        parts.append(f"<li{cls}><b>{html.escape(fam)}</b><span>{html.escape(text)}.</span></li>")
    parts.append("</ul>")
    parts.append("<table class='meta'>")
    for label, value in report.meta_lines(meta):
        parts.append(f"<tr><td>{html.escape(label)}</td><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for p in plots:
            name = os.path.basename(p)
            parts.append(f"<img class='plot' alt='{html.escape(name)}' src='{_data_uri(p)}'>")
    parts.append("<h2>Scenarios</h2>")
    parts.append(f"<p class='note'>{html.escape(report.definitions(rows))}</p>")
    parts.append(_table(rows))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(path, meta: dict, rows, plots=()) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(meta, rows, plots))
    return path
