"""The class report as one self-contained HTML page: the summary, a bar chart of the per-class
accuracy deltas (matplotlib, inline SVG), an overview table and one section per class with its
descriptions beside those of the classes it is confused with.

Nothing is loaded from the network. The chart keeps its text as text (``svg.fonttype: none``), so
the browser draws glosses in any script with its own fonts. Every text from a description run
came from an LLM: the template autoescapes it, and the chart's labels are escaped for mathtext.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import jinja2

from gsp.atomic import write_text_atomic

#: Above this many classes the chart shows only the most hurt and the most helped half each.
CHART_MAX_BARS = 60
HURT, HELPED, SAME = "#c0392b", "#1e8449", "#7f8c8d"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def points(value: float | None) -> str:
    """A delta in percentage points, signed (a real minus sign reads better than a hyphen)."""
    if value is None:
        return "n/a"
    text = f"{100 * value:+.1f} pts"
    if text[1:] == "0.0 pts":  # also a -0.0 from rounding
        return "\u00b10.0 pts"
    return text.replace("-", "\u2212")


def delta_class(value: float | None) -> str:
    if value is None:
        return "na"
    return "up" if value > 1e-12 else "down" if value < -1e-12 else "same"


def chart_rows(classes: list[dict], max_bars: int = CHART_MAX_BARS) -> tuple[list[dict], bool]:
    """The classes the chart shows (in the report's order) and whether some were left out."""
    rows = [c for c in classes if c["delta"] is not None]
    if len(rows) <= max_bars:
        return rows, False
    half = max_bars // 2
    return rows[:half] + rows[-half:], True


def _axis_label(cls: dict) -> str:
    name = f"{cls['label']} {cls['gloss']}" if cls["gloss"] else str(cls["label"])
    if len(name) > 40:  # a long gloss would squeeze the bars; the table below has it whole
        name = name[:39] + "\u2026"
    return name.replace("$", r"\$")  # a gloss is not mathtext


def delta_chart_svg(classes: list[dict]) -> str:
    """The horizontal bar chart of the deltas as an inline ``<svg>`` element ('' when no class
    has test clips in both runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, partial = chart_rows(classes)
    if not rows:
        return ""
    values = [100 * c["delta"] for c in rows]
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "gsp-class-report",
                                "font.family": "sans-serif", "font.size": 10}), warnings.catch_warnings():
        # matplotlib's font lacks CJK glyphs; only its layout sees that, the browser draws them
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig, ax = plt.subplots(figsize=(8, 0.9 + 0.28 * len(rows)))
        try:
            y = list(range(len(rows)))
            bars = ax.barh(y, values, color=[{"up": HELPED, "down": HURT}.get(delta_class(c["delta"]), SAME)
                                             for c in rows])
            # a value beside each bar: an unchanged class has no bar to see
            ax.bar_label(bars, labels=[points(c["delta"]).removesuffix(" pts") for c in rows], padding=3,
                         fontsize=8, color="#333")
            ax.set_yticks(y, [_axis_label(c) for c in rows])
            ax.invert_yaxis()  # the report's order, most hurt on top
            ax.axvline(0, color="#333", linewidth=0.8)
            ax.set_xlabel("run − baseline, accuracy points")
            span = max(1.0, max(abs(v) for v in values))
            ax.set_xlim(-span * 1.3, span * 1.3)
            ax.grid(axis="x", alpha=0.3)
            title = "Per-class accuracy change"
            ax.set_title(title + (f" (the {len(rows) // 2} most hurt and most helped classes)" if partial else ""))
            fig.tight_layout()
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata={"Date": None})
        finally:
            plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Class report: {{ report.run.path | basename }} vs {{ report.baseline.path | basename }}</title>
<style>
body { font-family: system-ui, "Noto Sans", "Noto Sans CJK SC", "DejaVu Sans", sans-serif; margin: 1.5rem auto;
       max-width: 78rem; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.5rem; margin-bottom: .3rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.meta { border-collapse: collapse; margin: .5rem 0; }
.meta td, .meta th { padding: .15rem .8rem .15rem 0; text-align: left; }
.path { font-family: ui-monospace, monospace; font-size: .85rem; word-break: break-all; }
.counts span { display: inline-block; margin-right: 1.2rem; font-weight: 600; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: .3rem .6rem; margin: .3rem 0; }
.up { color: #1e8449; } .down { color: #c0392b; } .same, .na { color: #777; }
figure.chart { margin: 1rem 0; } figure.chart svg { max-width: 100%; height: auto; }
table.overview { border-collapse: collapse; width: 100%; font-size: .92rem; }
table.overview th, table.overview td { border-bottom: 1px solid #ddd; padding: .25rem .5rem; text-align: left; }
table.overview td.num, table.overview th.num { text-align: right; font-variant-numeric: tabular-nums; }
section.cls { border-top: 2px solid #ccc; padding-top: .6rem; margin-top: 1.4rem; }
section.cls h3 { margin: 0; font-size: 1.1rem; } .acc { margin: .2rem 0 .6rem; color: #444; }
.side { display: grid; grid-template-columns: repeat(auto-fit, minmax(17rem, 1fr)); gap: .8rem; }
.col { background: #f6f7f9; border-radius: 6px; padding: .5rem .7rem; }
.col.self { background: #eef4fb; } .col h4 { margin: 0 0 .4rem; font-size: .95rem; }
.kind { font-size: .75rem; font-weight: 700; color: #555; margin-right: .3rem; }
.text { margin: .25rem 0; } .failed { color: #a33; font-style: italic; }
.part { display: inline-block; font-size: .72rem; background: #dde6f0; border-radius: 3px; padding: 0 .3rem;
        margin-right: .2rem; font-family: ui-monospace, monospace; }
.none { color: #777; font-style: italic; }
</style>
</head>
<body>
<h1>Class report</h1>
<table class="meta">
<tr><th>run</th><td class="path">{{ report.run.path }}</td><td>{{ run_line(report.run) }}</td></tr>
<tr><th>baseline</th><td class="path">{{ report.baseline.path }}</td><td>{{ run_line(report.baseline) }}</td></tr>
<tr><th>descriptions</th><td class="path">{{ report.descriptions }}</td><td></td></tr>
</table>
{% set s = report.summary %}
<p class="counts" id="summary"><span class="up">{{ s.helped }} helped</span>
<span class="down">{{ s.hurt }} hurt</span><span class="same">{{ s.unchanged }} unchanged</span>
<span class="na">{{ s.without_test_clips }} without test clips (n/a)</span>
<span>mean change {{ points(s.mean_delta) }}</span></p>
{% for note in report.notes %}<p class="note">{{ note }}</p>{% endfor %}
<p>Most hurt first. Each class below shows its own descriptions beside those of the classes its test clips
were mistaken for in the run: where the texts do not say what tells two signs apart, look first.</p>
{% if chart %}<figure class="chart" id="delta-chart" role="img" aria-label="bar chart of the per-class accuracy change">
{{ chart | safe }}</figure>{% else %}<p class="none">No class has test clips in both runs: no chart.</p>{% endif %}
<h2>Classes</h2>
<table class="overview">
<thead><tr><th class="num">label</th><th>gloss</th><th class="num">test clips</th><th class="num">baseline</th>
<th class="num">run</th><th class="num">change</th><th>most confused with</th></tr></thead>
<tbody>
{% for c in report.classes %}<tr><td class="num"><a href="#class-{{ c.label }}">{{ c.label }}</a></td>
<td>{{ c.gloss or "" }}</td><td class="num">{{ c.support }}</td><td class="num">{{ pct(c.baseline_accuracy) }}</td>
<td class="num">{{ pct(c.run_accuracy) }}</td><td class="num {{ delta_class(c.delta) }}">{{ points(c.delta) }}</td>
<td>{% for o in c.confused_with %}{{ o.label }} {{ o.gloss or "" }} ({{ o.count }})
{%- if not loop.last %}, {% endif %}{% endfor %}</td></tr>
{% endfor %}</tbody>
</table>
{% macro texts(d) -%}
{% for kind in ["Tg", "Tp"] %}{% for e in d[kind] %}<p class="text"{% if e.lang %} lang="{{ e.lang }}"{% endif %}>
<span class="kind">{{ kind }}</span>{% for p in e.body_parts %}<span class="part">{{ p }}</span>{% endfor %}
{% if e.text is not none %}{{ e.text }}
{%- else %}<span class="failed">failed: {{ e.error or "no text" }}</span>{% endif %}</p>
{% endfor %}{% endfor %}
{% if not d.Tg and not d.Tp %}<p class="none">no Tg or Tp description</p>{% endif %}
{%- endmacro %}
{% for c in report.classes %}
<section class="cls" id="class-{{ c.label }}">
<h3>{{ c.label }} · {{ c.gloss or "(no gloss)" }}
<span class="{{ delta_class(c.delta) }}">{{ points(c.delta) }}</span></h3>
<p class="acc">{% if c.support %}baseline {{ pct(c.baseline_accuracy) }} → run {{ pct(c.run_accuracy) }}
· {{ c.support }} test clip{{ "" if c.support == 1 else "s" }}
{%- else %}no test clips: accuracy n/a in both runs{% endif %}</p>
<div class="side">
<div class="col self"><h4>{{ c.gloss or c.label }} (this sign)</h4>{{ texts(c.descriptions) }}</div>
{% for o in c.confused_with %}<div class="col other"><h4>mistaken for {{ o.label }} · {{ o.gloss or "(no gloss)" }}:
{{ o.count }} of {{ c.support }} clips ({{ pct(o.share) }}; baseline {{ o.baseline_count }})</h4>
{{ texts(o.descriptions) }}</div>
{% endfor %}{% if not c.confused_with and c.support %}
<div class="col other"><h4>never mistaken for another sign in the run</h4></div>{% endif %}
</div>
</section>
{% endfor %}
</body>
</html>
"""


def _run_line(info: dict) -> str:
    kind = f"contrastive ({info['ablation']})" if info.get("contrastive") else "CE only"
    return f"top-1 {pct(info.get('top1'))}, mean class accuracy {pct(info.get('mean_class_accuracy'))}, {kind}"


def render_page(report: dict) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True)
    env.filters["basename"] = lambda p: Path(p).name
    env.globals.update(pct=pct, points=points, delta_class=delta_class, run_line=_run_line)
    return env.from_string(PAGE).render(report=report, chart=delta_chart_svg(report["classes"]))


def write_page(report: dict, path: Path | str) -> Path:
    """Render and write the page atomically."""
    path = Path(path)
    write_text_atomic(path, render_page(report))
    return path
