"""The report's HTML pieces: tables, cards, the page shell with its inline CSS, a sorting script and a
Content-Security-Policy that forbids every request. They take strings and numbers; the page modules
decide what goes on a page.
"""

from __future__ import annotations

import html
import math
from typing import Any

STATUS_COLORS = {"completed": "#2ca02c", "stopped_early": "#ff7f0e", "collapsed": "#9467bd", "diverged": "#d62728",
                 "failed": "#7f7f7f"}
"""Each trial status's colour, in figures and in table cells."""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:18px 20px 60px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-bottom:14px}.glance{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{background:#fff;border:1px solid #dde;border-radius:8px;padding:12px 16px;flex:1 1 230px}
.card .k{color:#667;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:24px;font-weight:650;margin:2px 0}.card .d{color:#555;font-size:13px}
.card.win{border:2px solid #2ca02c;background:#f3fbf3}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:13px}.scroll{overflow-x:auto;max-width:100%}
th,td{border:1px solid #dde;padding:4px 8px;text-align:right;white-space:nowrap}th{background:#eef1f5}
td.t,th.t{text-align:left}tr.best td{background:#eaf7ea;font-weight:600}tr.hit td{background:#eaf7ea}
td.w{white-space:pre-wrap;overflow-wrap:anywhere;text-align:left;vertical-align:top;min-width:8em;max-width:30em}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#aab}
.status-completed{color:#2a7d2a}.status-stopped_early{color:#b35900}.status-collapsed{color:#7d3c98}
.status-diverged,.status-failed{color:#c0392b}
img{max-width:100%;display:block;margin:6px 0;background:#fff}.note{color:#777;font-style:italic}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}details{margin:8px 0}pre{background:#fff;padding:8px}
"""


SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var b=t.tBodies[0],rows=Array.from(b.rows),up=th.dataset.dir!=='asc';th.dataset.dir=up?'asc':'desc';
    function v(r){var c=r.cells[i],x=c.dataset.v!==undefined?c.dataset.v:c.textContent,n=parseFloat(x);
      return x!==''&&!isNaN(n)&&isFinite(x)?n:x;}
    rows.sort(function(a,c){var x=v(a),y=v(c);if(typeof x!==typeof y){x=String(x);y=String(y);}
      return (x<y?-1:x>y?1:0)*(up?1:-1);});rows.forEach(function(r){b.appendChild(r);});});});});
"""


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; form-action 'none'"


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


class Html(str):
    """A table cell's markup, already escaped: :func:`table` puts it in as it is."""


CLIP = 240
"""A text cell shows at most this many characters (:func:`clip`)."""


def clip(text: str | None, limit: int = CLIP) -> Html:
    """A text cell: ``text`` escaped, newlines kept; one longer than ``limit`` characters is cut at a word boundary
    with '…' and carries the whole text in its title (shown on hover). None: '-'; an empty text: '(empty)'."""
    if text is None:
        return Html("-")
    if not text.strip():
        return Html('<span class="note">(empty)</span>')
    if len(text) <= limit:
        return Html(esc(text))
    cut = text[:limit]
    space = cut.rfind(" ")
    cut = cut[:space] if space > limit // 2 else cut
    return Html(f'<span title="{esc(text)}">{esc(cut.rstrip())}…</span>')


def fmt(v: Any, option: bool = False) -> str:
    """A cell: floats with 4 decimals (small ones in e-notation), None as '-'. An ``option`` value
    (alpha 16.0, lr 5e-4, dropout 0.1) is shown as written: whole numbers without decimals, 3 digits."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and option:
        return str(int(v)) if v.is_integer() and abs(v) < 1e6 else f"{v:.3g}"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and abs(v) < 1e-2 else f"{v:.4f}" if abs(v) < 1e3 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def table(headers: list[str], rows: list[list[Any]], *, sortable: bool = False, text_cols: int = 1,
          row_class: list[str] | None = None, options: tuple[str, ...] = ()) -> str:
    """An HTML table; the first ``text_cols`` columns are left-aligned; numbers sort by value; the
    columns named in ``options`` hold option values (:func:`fmt`); an :class:`Html` cell is markup, put in as it is
    (in a wrapping text cell)."""
    th = "".join(f'<th class="t">{esc(h)}</th>' if i < text_cols else f"<th>{esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for n, row in enumerate(rows):
        cells = []
        for i, v in enumerate(row):
            attrs = ' class="t"' if i < text_cols else ""
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                attrs += f' data-v="{v!r}"'
            if isinstance(v, Html):
                cells.append(f'<td class="w">{v}</td>')
                continue
            if isinstance(v, str) and v in STATUS_COLORS:
                attrs = f' class="t status-{v}"'
            cells.append(f"<td{attrs}>{esc(fmt(v, headers[i] in options))}</td>")
        cls = f' class="{row_class[n]}"' if row_class and row_class[n] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f'<table{" class=sortable" if sortable else ""}><thead><tr>{th}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


def card(key: str, value: str, detail: str = "", win: bool = False) -> str:
    return (f'<div class="card{" win" if win else ""}"><div class="k">{esc(key)}</div><div class="v">{esc(value)}</div>'
            f'<div class="d">{esc(detail)}</div></div>')


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def page(title: str, glance: list[str], body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name=viewport content="width=device-width,initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><main>{''.join(glance)}{''.join(body)}</main>"
            f"<script>{SORT_JS}</script></body></html>\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def count(n: float) -> str:
    return f"{n:,.0f}"


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_number(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
