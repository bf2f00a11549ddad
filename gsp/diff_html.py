"""``gsp diff --html``: one self-contained page (inline CSS, no script, no font or file fetched),
the summary on top and one section per sign.

Texts are untrusted LLM output: the template autoescapes everything, and the highlighted
segments are escaped here before they are marked safe. Every text carries its row's language
(``lang``), so the browser picks fonts and line breaking for Chinese, Turkish or anything else.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from gsp.atomic import write_text_atomic
from gsp.diff import CHANGE_TYPES, FAILED, DiffResult, RowChange, RowState, Segment, prompt_change_text

_TAGS = {"delete": "del", "insert": "ins"}

CSS = """
:root { color-scheme: light; --add: #1a7f37; --del: #b42318; --chg: #9a6700; --muted: #57606a; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1200px; padding: 24px 28px 64px; color: #1f2328; background: #fff;
  font: 16px/1.6 system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", "Source Han Sans SC",
  "PingFang SC", "Microsoft YaHei", "WenQuanYi Micro Hei", "Hiragino Sans", sans-serif; }
h1 { font-size: 1.5rem; margin: 0 0 4px; }
h2 { font-size: 1.2rem; margin: 0; }
code, .key { font-family: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: .85em; }
.paths { color: var(--muted); margin: 0 0 16px; overflow-wrap: anywhere; }
.summary { border: 1px solid #d0d7de; border-radius: 8px; padding: 16px 20px; background: #f6f8fa; }
.summary table { border-collapse: collapse; margin: 4px 0 12px; }
.summary th, .summary td { padding: 4px 14px; border-bottom: 1px solid #d0d7de; text-align: right; }
.summary th:first-child, .summary td:first-child { text-align: left; }
.summary tfoot td { font-weight: 600; border-bottom: none; }
.summary ul { margin: 6px 0; padding-left: 20px; }
.n-added { color: var(--add); } .n-removed { color: var(--del); } .n-changed { color: var(--chg); }
nav.signs { margin: 12px 0 0; line-height: 2; }
nav.signs a { display: inline-block; margin: 0 6px 0 0; padding: 0 8px; border: 1px solid #d0d7de;
  border-radius: 12px; color: #0969da; text-decoration: none; font-size: .9em; }
section.sign { margin-top: 28px; border-top: 2px solid #d0d7de; padding-top: 12px; }
section.sign h2 .label { color: var(--muted); font-weight: normal; }
article.row { margin: 12px 0; border: 1px solid #d0d7de; border-left: 5px solid #d0d7de; border-radius: 6px;
  padding: 8px 12px; }
article.added { border-left-color: var(--add); } article.removed { border-left-color: var(--del); }
article.changed { border-left-color: var(--chg); }
.rowhead { display: flex; flex-wrap: wrap; gap: 10px; align-items: baseline; }
.kind { font-weight: 700; }
.badge { font-size: .8em; padding: 0 8px; border-radius: 10px; color: #fff; background: var(--muted); }
.badge.added { background: var(--add); } .badge.removed { background: var(--del); }
.badge.changed { background: var(--chg); }
.parts { color: var(--muted); font-size: .9em; }
.contrast { color: var(--muted); font-size: .9em; margin: .2em 0 0; }
.texts { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; margin-top: 6px; }
@media (max-width: 760px) { .texts { grid-template-columns: 1fr; } }
.side { min-width: 0; }
.side .which { display: block; font-size: .75em; color: var(--muted); text-transform: uppercase;
  letter-spacing: .05em; }
.text { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; line-break: strict; }
.text:lang(zh), .text:lang(ja), .text:lang(ko) { line-height: 1.8; }
.none { color: var(--muted); font-style: italic; }
del { background: #ffebe9; color: var(--del); text-decoration: line-through; text-decoration-thickness: 1px; }
ins { background: #dafbe1; color: #116329; text-decoration: none; border-bottom: 2px solid var(--add); }
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gsp diff · {{ s.old }} → {{ s.new }}</title>
<style>{{ css }}</style>
</head>
<body>
<h1>Description changes</h1>
<p class="paths">old <code>{{ s.old }}</code> → new <code>{{ s.new }}</code></p>
<div class="summary" id="summary">
<table>
<thead><tr><th>kind</th>{% for t in types %}<th>{{ t }}</th>{% endfor %}</tr></thead>
<tbody>{% for k in s.kinds %}<tr><td>{{ k }}</td>{% for t in types %}{% set n = s.counts[k][t] %}
<td{% if n and t != "unchanged" %} class="n-{{ t }}"{% endif %}>{{ n }}</td>
{% endfor %}</tr>{% endfor %}</tbody>
<tfoot><tr><td>all</td>{% for t in types %}<td>{{ s.totals[t] }}</td>{% endfor %}</tr></tfoot>
</table>
<ul>
<li><strong>{{ s.signs_touched }}</strong> sign(s) touched{% if filters %}; filters: {{ filters }}{% endif %}</li>
{% if s.model %}<li>model: {% if s.model.changed %}<code>{{ s.model.old }}</code> → <code>{{ s.model.new }}</code>
{% else %}<code>{{ s.model.old }}</code> (unchanged){% endif %}</li>{% endif %}
{% for p in prompts %}<li>prompt changed: {{ p }}</li>
{% endfor %}{% if s.model and not s.prompts %}<li>prompts unchanged</li>{% endif %}
{% for n in s.notes %}<li class="note">{{ n }}</li>{% endfor %}
</ul>
{% if signs %}<nav class="signs">{% for label, gloss, rows in signs %}<a href="#sign-{{ label }}">{{ gloss }}</a>
{% endfor %}</nav>{% else %}<p>No description changed{% if filters %} among the rows the filters keep{% endif %}.</p>
{% endif %}
</div>
{% for label, gloss, rows in signs %}
<section class="sign" id="sign-{{ label }}">
<h2>{{ gloss }} <span class="label">· label {{ label }}</span></h2>
{% for r in rows %}
<article class="row {{ r.change }}" id="row-{{ r.key }}" data-key="{{ r.key }}" data-change="{{ r.change }}">
<div class="rowhead"><span class="kind">{{ r.kind }}</span><span class="key">{{ r.key }}</span>
<span class="badge {{ r.change }}">{{ r.change }}</span>
{% if r.parts %}<span class="parts">{{ r.parts }}</span>{% endif %}</div>
<div class="texts">
<div class="side old"><span class="which">old</span>{{ r.old_html }}</div>
<div class="side new"><span class="which">new</span>{{ r.new_html }}</div>
</div>
</article>
{% endfor %}
</section>
{% endfor %}
</body>
</html>
"""


def segments_html(segments: list[Segment]) -> Markup:
    return Markup("").join(Markup(f"<{_TAGS[op]}>{escape(text)}</{_TAGS[op]}>") if op in _TAGS else escape(text)
                           for op, text in segments)


def side_html(state: RowState, segments: list[Segment], lang: str) -> Markup:
    if state.text is None:
        why = (f"failed — no text ({state.error})" if state.error else "failed — no text") \
            if state.status == FAILED else "not in this run"
        return Markup('<p class="text none">{}</p>').format(why)
    attr = Markup(' lang="{}"').format(lang) if lang else Markup("")
    text = Markup('<p class="text"{}>{}</p>').format(attr, segments_html(segments))
    if state.contrast_with:
        text += Markup('<p class="contrast">rewritten to be told apart from {}</p>').format(state.contrast_with)
    return text


def parts_html(r: RowChange) -> Markup:
    """Body parts, with the parts a changed row dropped struck out and the ones it gained marked."""
    old, new = r.old.body_parts, r.new.body_parts
    if not old and not new:
        return Markup("")
    if r.change != "changed" or old == new:
        return Markup("body parts: {}").format(", ".join(new or old))
    shown = [("equal", p) if p in old and p in new else ("delete", p) if p in old else ("insert", p)
             for p in sorted(set(old) | set(new), key=lambda p: (new + old).index(p))]
    return Markup("body parts: ") + Markup(", ").join(segments_html([seg]) for seg in shown)


def parts_line(r: RowChange) -> str:
    old, new = r.old.body_parts, r.new.body_parts
    if not old and not new:
        return ""
    if old == new or r.old.text is None or r.new.text is None:
        return "body parts: " + ", ".join(new or old)
    return f"body parts: {', '.join(old) or '—'} → {', '.join(new) or '—'}"


def _row_view(r: RowChange) -> dict:
    old_segs, new_segs = r.segments
    return {"key": r.key, "kind": r.kind, "change": r.change, "parts": parts_html(r),
            "old_html": side_html(r.old, old_segs, r.lang), "new_html": side_html(r.new, new_segs, r.lang)}


def render_html(result: DiffResult) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    s = result.summary
    filters = ", ".join(f"--{k} {v}" if v is not True else f"--{k}" for k, v in s["filters"].items())
    signs = [(label, gloss or f"label {label}", [_row_view(r) for r in rows])
             for label, gloss, rows in result.by_sign()]
    return env.from_string(TEMPLATE).render(s=s, css=Markup(CSS), types=CHANGE_TYPES, filters=filters, signs=signs,
                                          prompts=[prompt_change_text(p) for p in s["prompts"]])


def write_html(result: DiffResult, target: Path) -> Path:
    """Write the page atomically; returns its path."""
    write_text_atomic(target, render_html(result))
    return Path(target)
