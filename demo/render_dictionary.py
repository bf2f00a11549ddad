"""Render the bundled demo dictionaries from their structured sources.

    python -m demo.render_dictionary [--out-dir knowledge_base] [--cjk-font PATH]

Writes, under ``--out-dir``:

* ``demo_dictionary.pdf`` - the English dictionary rendered from ``demo_signs.yaml``: a title page
  with the disclaimer, the handshape chart, then the entries in alphabetical order;
* ``demo_vocab.csv`` - the demo vocabulary in AUTSL's ``ClassId,TR,EN`` format, sorted by ClassId;
* ``zh/demo_dictionary_zh.pdf`` - the small Chinese dictionary rendered from ``demo_signs_zh.yaml``
  with a CJK TrueType font from the Debian package ``fonts-wqy-microhei``.

Layout choices serve text extraction, because these PDFs are the input of the knowledge base:
every headword is printed on its own line, text is left-aligned (justified text adds word-spacing
operators some extractors turn into odd spaces), nothing is hyphenated, and an entry is never
split across pages (``unbreakable``) so a chunker sees headword and prose together. The output
is deterministic - fixed creation date, no random ids - so re-rendering does not churn git diffs.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import yaml
from fpdf import FPDF
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from demo.sign_source import DEFAULT_SOURCE, KB_DIR, Sign, SignSource, load_sign_source
from gsp.atomic import write_bytes_atomic, write_text_atomic

SOURCE_EN = DEFAULT_SOURCE
SOURCE_ZH = KB_DIR / "demo_signs_zh.yaml"
PDF_EN = "demo_dictionary.pdf"
PDF_ZH = "zh/demo_dictionary_zh.pdf"
VOCAB_CSV = "demo_vocab.csv"

# A fixed date keeps the PDF byte-identical across renders (fpdf2 otherwise stamps "now").
FIXED_DATE = datetime(2024, 1, 1, tzinfo=UTC)

CJK_FONT_PACKAGE = "fonts-wqy-microhei"
CJK_FONT_CANDIDATES = (
    Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
)

NOTES_LABEL = "Notes:"
ZH_NOTES_LABEL = "备注："


class RenderError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# Text helpers shared with the tests (one home for how a headword is printed)
# --------------------------------------------------------------------------------------------

def headword(sign: Sign) -> str:
    """The printed headword: English gloss in capitals, Turkish gloss in parentheses.

    Underscores in AUTSL glosses become spaces, as a printed dictionary would show them
    ('get_well' -> 'GET WELL').
    """
    return f"{sign.gloss.replace('_', ' ').upper()} ({sign.native.replace('_', ' ')})"


def chart_heading(shape_id: str, name: str) -> str:
    return f"'{shape_id}' - {name}"


def _single_line(text: str) -> str:
    """YAML folded text may still carry newlines; the PDF wraps text itself."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# English dictionary
# --------------------------------------------------------------------------------------------

class _DictionaryPDF(FPDF):
    """FPDF with a page-number footer; the title page carries none."""

    footer_text = "page {n}"
    footer_font: tuple[str, str, int] = ("helvetica", "", 8)

    def footer(self) -> None:
        if self.page_no() == 1:
            return
        self.set_y(-12)
        self.set_font(*self.footer_font)
        self.cell(0, 6, self.footer_text.format(n=self.page_no()), align="C")


def _new_pdf(title: str, language: str) -> _DictionaryPDF:
    pdf = _DictionaryPDF(format="A4")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_title(title)
    pdf.set_author("gsp-mc project")
    # The renderer's old path: the creator string is part of the PDF bytes, and keeping it keeps
    # the committed PDFs byte-identical to a fresh render (tests/test_dictionary.py).
    pdf.set_creator("knowledge_base/render_dictionary.py")
    pdf.set_lang(language)
    pdf.set_auto_page_break(auto=True, margin=18)
    pdf.set_margins(20, 20, 20)
    return pdf


def _para(pdf: FPDF, height: float, text: str, **kwargs) -> None:
    pdf.multi_cell(0, height, text, align="L", new_x="LMARGIN", new_y="NEXT", **kwargs)


def _check_latin1(source: SignSource, path: Path) -> None:
    """The core Helvetica font covers Latin-1 only; fail naming the field instead of printing '?'."""
    def check(where: str, text: str) -> None:
        try:
            text.encode("latin-1")
        except UnicodeEncodeError as exc:
            raise RenderError(
                f"{path}: {where}: character {text[exc.start]!r} is outside Latin-1, "
                "which the English dictionary's core font cannot print"
            ) from exc

    check("title", source.title)
    check("disclaimer", source.disclaimer)
    for h in source.handshapes:
        check(f"handshape {h.id!r} name", h.name)
        check(f"handshape {h.id!r} description", h.description)
    for s in source.signs:
        check(f"sign {s.gloss!r} prose", s.prose)
        for i, note in enumerate(s.notes):
            check(f"sign {s.gloss!r} notes[{i}]", note)


def render_dictionary_pdf(source: SignSource, source_path: Path = SOURCE_EN) -> bytes:
    """The English demo dictionary as PDF bytes: title page, handshape chart, entries."""
    _check_latin1(source, source_path)
    pdf = _new_pdf(source.title, "en")
    _title_page(pdf, source)
    _chart_pages(pdf, source)
    _entry_pages(pdf, source)
    return bytes(pdf.output())


def _title_page(pdf: FPDF, source: SignSource) -> None:
    """Title, counts, the disclaimer and how to read the entries."""
    pdf.add_page()
    pdf.set_y(60)
    pdf.set_font("helvetica", "B", 22)
    _para(pdf, 11, source.title)
    pdf.ln(4)
    pdf.set_font("helvetica", "", 12)
    _para(pdf, 7, f"{len(source.signs)} entries and a chart of {len(source.handshapes)} handshapes")
    pdf.ln(10)
    pdf.set_font("helvetica", "B", 12)
    _para(pdf, 7, "Disclaimer")
    pdf.set_font("helvetica", "", 11)
    _para(pdf, 6, _single_line(source.disclaimer))
    pdf.ln(8)
    pdf.set_font("helvetica", "B", 11)
    _para(pdf, 6, "How to read this dictionary")
    pdf.set_font("helvetica", "", 10)
    _para(pdf, 5.5, (
        "Entries describe the right (dominant) hand unless both hands are named. Handshapes are "
        "cited by their id in the handshape chart, for example the '5' handshape. An entry that "
        "says 'make the sign for X' means: perform the entry X at that point."
    ))


def _chart_pages(pdf: FPDF, source: SignSource) -> None:
    """The handshape chart the entries cite by id."""
    pdf.add_page()
    pdf.set_font("helvetica", "B", 16)
    _para(pdf, 9, "Handshape chart")
    pdf.ln(2)
    pdf.set_font("helvetica", "", 10)
    _para(pdf, 5.5, "The entries refer to these handshapes by their id in quotes.")
    pdf.ln(3)
    for shape in source.handshapes:
        with pdf.unbreakable() as doc:
            doc.set_font("helvetica", "B", 12)
            _para(doc, 6.5, chart_heading(shape.id, shape.name))
            doc.set_font("helvetica", "", 10.5)
            _para(doc, 5.5, _single_line(shape.description))
            doc.ln(3)


def _entry_pages(pdf: FPDF, source: SignSource) -> None:
    """The entries, alphabetical by English gloss, each kept on one page with its headword."""
    pdf.add_page()
    pdf.set_font("helvetica", "B", 16)
    _para(pdf, 9, "Entries")
    pdf.ln(3)
    for sign in sorted(source.signs, key=lambda s: (s.gloss.casefold(), s.class_id)):
        with pdf.unbreakable() as doc:
            doc.set_font("helvetica", "B", 12.5)
            _para(doc, 6.5, headword(sign))
            doc.set_font("helvetica", "", 10.5)
            _para(doc, 5.5, _single_line(sign.prose))
            if sign.notes:
                doc.ln(1)
                doc.set_font("helvetica", "I", 8.5)
                _para(doc, 4.5, NOTES_LABEL)
                for note in sign.notes:
                    _para(doc, 4.5, _single_line(note))
            doc.ln(4)


def vocab_csv(source: SignSource) -> str:
    """The demo vocabulary in AUTSL's format (ClassId,TR,EN), sorted by ClassId."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ClassId", "TR", "EN"])
    for sign in sorted(source.signs, key=lambda s: s.class_id):
        writer.writerow([sign.class_id, sign.native, sign.gloss])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Chinese dictionary
# --------------------------------------------------------------------------------------------

class ZhEntry(BaseModel):
    """One entry of ``demo_signs_zh.yaml``; glosses are SLR500's exact ZH and EN values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    class_id: int = Field(ge=0, description="SLR500 ClassId.")
    gloss_zh: str = Field(min_length=1, description="Chinese gloss (SLR500 ZH column); the headword.")
    gloss_en: str = Field(min_length=1, description="English gloss (SLR500 EN column).")
    prose: str = Field(min_length=1, description="The entry text in Chinese.")
    notes: list[str] = Field(default_factory=list, description="Non-action remarks.")


class ZhSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str
    disclaimer: str
    entries: list[ZhEntry] = Field(min_length=1)


def load_zh_source(path: Path | str = SOURCE_ZH) -> ZhSource:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        source = ZhSource.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise RenderError(f"{path}: {exc}") from exc
    ids = [e.class_id for e in source.entries]
    if len(ids) != len(set(ids)):
        raise RenderError(f"{path}: duplicate class_id in entries")
    return source


def find_cjk_font(explicit: Path | str | None = None) -> Path:
    """The CJK font file: ``explicit`` if given, else the one ``fonts-wqy-microhei`` installs."""
    candidates = [Path(explicit)] if explicit else list(CJK_FONT_CANDIDATES)
    for path in candidates:
        if path.is_file():
            return path
    raise RenderError(
        "CJK font not found (looked at: " + ", ".join(str(p) for p in candidates) + "). "
        f"Install the Debian package {CJK_FONT_PACKAGE} (apt-get install {CJK_FONT_PACKAGE}) "
        "or pass --cjk-font PATH to a TrueType/TTC font with Chinese glyphs."
    )


def render_zh_pdf(source: ZhSource, font_path: Path) -> bytes:
    """The Chinese demo dictionary as PDF bytes, set in the given CJK font."""
    pdf = _new_pdf(source.title, "zh-CN")
    pdf.add_font("cjk", "", fname=str(font_path))
    pdf.footer_font = ("cjk", "", 8)
    pdf.footer_text = "第 {n} 页"
    # Chinese has no spaces between words: wrap at any character.
    para = partial(_para, wrapmode="CHAR")

    pdf.add_page()
    pdf.set_y(60)
    pdf.set_font("cjk", "", 22)
    para(pdf, 11, source.title)
    pdf.ln(10)
    pdf.set_font("cjk", "", 13)
    para(pdf, 7, "声明")
    pdf.set_font("cjk", "", 11)
    para(pdf, 6.5, _single_line(source.disclaimer))

    pdf.add_page()
    pdf.set_font("cjk", "", 16)
    para(pdf, 9, "词条")
    pdf.ln(3)
    for entry in sorted(source.entries, key=lambda e: e.class_id):
        # Inside `unbreakable` every call must go through `doc`: it records them so it can
        # replay the whole entry on the next page (calls on `pdf` would be lost).
        with pdf.unbreakable() as doc:
            doc.set_font("cjk", "", 14)
            para(doc, 7.5, entry.gloss_zh)
            doc.set_font("cjk", "", 9)
            para(doc, 5, f"英文：{entry.gloss_en}")
            doc.set_font("cjk", "", 11)
            para(doc, 6.5, _single_line(entry.prose))
            if entry.notes:
                doc.set_font("cjk", "", 9)
                para(doc, 5, ZH_NOTES_LABEL)
                for note in entry.notes:
                    para(doc, 5, _single_line(note))
            doc.ln(4)
    return bytes(pdf.output())


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def render_all(out_dir: Path, cjk_font: Path | None = None,
               source_en: Path = SOURCE_EN, source_zh: Path = SOURCE_ZH) -> dict[str, Path]:
    """Render every artifact into ``out_dir``; returns what was written, by name."""
    font = find_cjk_font(cjk_font)  # fail before writing anything
    source = load_sign_source(source_en)
    zh = load_zh_source(source_zh)
    written = {
        PDF_EN: out_dir / PDF_EN,
        VOCAB_CSV: out_dir / VOCAB_CSV,
        PDF_ZH: out_dir / PDF_ZH,
    }
    write_bytes_atomic(written[PDF_EN], render_dictionary_pdf(source, source_en))
    write_text_atomic(written[VOCAB_CSV], vocab_csv(source))
    write_bytes_atomic(written[PDF_ZH], render_zh_pdf(zh, font))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=KB_DIR, help="where to write (default: knowledge_base/)")
    parser.add_argument("--cjk-font", type=Path, default=None,
                        help=f"CJK font file (default: the one {CJK_FONT_PACKAGE} installs)")
    args = parser.parse_args(argv)
    try:
        written = render_all(args.out_dir, args.cjk_font)
    except (RenderError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
