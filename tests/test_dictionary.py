"""The bundled demo dictionary: its structured sources, the committed PDFs and the renderer.

Everything here reads the real files (YAML, AUTSL/SLR500 vocabularies, committed PDFs) and
renders real PDFs with fpdf2; text is checked with pypdf, as the knowledge base will read it.
"""

from __future__ import annotations

import csv
import itertools
import re
from pathlib import Path

import pypdf
import pytest

from demo import render_dictionary as rd
from demo.sign_source import KB_DIR as KB
from demo.sign_source import SignSource, SignSourceError, load_sign_source
from gsp.settings import PROJECT_ROOT

VOCAB_DIR = PROJECT_ROOT / "data" / "vocab"


@pytest.fixture(scope="module")
def source() -> SignSource:
    return load_sign_source(KB / "demo_signs.yaml")


@pytest.fixture(scope="module")
def zh_source():
    return rd.load_zh_source(KB / "demo_signs_zh.yaml")


def _vocab(name: str) -> dict[int, dict[str, str]]:
    path = VOCAB_DIR / name
    assert path.is_file(), f"vocabulary {path} is missing (it is part of the repository: data/vocab/)"
    with path.open(encoding="utf-8", newline="") as fh:
        return {int(row["ClassId"]): row for row in csv.DictReader(fh)}


def _pdf_pages(path: Path) -> list[str]:
    return [page.extract_text() for page in pypdf.PdfReader(path).pages]


def _squash(text: str) -> str:
    """Collapse whitespace: line wraps are layout, not content."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# The structured source
# --------------------------------------------------------------------------------------------

def test_source_validates_with_about_forty_signs(source):
    assert 35 <= len(source.signs) <= 50
    assert len(source.handshapes) >= 12
    assert "not an authoritative reference" in source.disclaimer


def test_signs_use_exact_autsl_ids_and_glosses(source):
    autsl = _vocab("autsl.csv")
    for sign in source.signs:
        assert sign.class_id in autsl, f"{sign.gloss}: ClassId {sign.class_id} not in autsl.csv"
        row = autsl[sign.class_id]
        assert (sign.gloss, sign.native) == (row["EN"], row["TR"]), f"ClassId {sign.class_id}"


def test_committed_vocab_csv_is_the_autsl_rows_sorted(source):
    text = (KB / "demo_vocab.csv").read_text(encoding="utf-8")
    assert text == rd.vocab_csv(source), "demo_vocab.csv is stale: re-run python -m demo.render_dictionary"
    autsl_lines = (VOCAB_DIR / "autsl.csv").read_text(encoding="utf-8").splitlines()
    lines = text.splitlines()
    assert lines[0] == autsl_lines[0] == "ClassId,TR,EN"
    assert set(lines[1:]) <= set(autsl_lines[1:])
    ids = [int(line.split(",")[0]) for line in lines[1:]]
    assert ids == sorted(ids) and len(ids) == len(source.signs)


def test_refs_and_handshapes_resolve(source):
    chart = {h.id for h in source.handshapes}
    glosses = {s.gloss for s in source.signs}
    ref_signs = 0
    for sign in source.signs:
        refs = [seg.ref for seg in sign.segments if seg.ref is not None]
        ref_signs += bool(refs)
        assert set(refs) <= glosses, sign.gloss
        expanded = source.expanded_segments(sign.gloss)
        assert all(seg.ref is None for seg in expanded), sign.gloss
        for seg in expanded:
            for hand in (seg.right, seg.left):
                if hand is not None:
                    assert hand.handshape in chart, f"{sign.gloss}: {hand.handshape}"
    assert ref_signs >= 4, "the dictionary needs several entries that refer to other entries"
    used = {hand.handshape for s in source.signs for seg in s.segments
            for hand in (seg.right, seg.left) if hand is not None}
    assert used == chart, f"chart handshapes no sign uses: {chart - used}"


def test_chart_handshapes_are_distinct_finger_configurations(source):
    # A "handshape-only" minimal pair is only a pair if the two shapes really look different.
    configs = {}
    for h in source.handshapes:
        key = (h.thumb, h.index, h.middle, h.ring, h.little, h.spread)
        assert key not in configs, f"handshapes {configs.get(key)!r} and {h.id!r} have the same fingers"
        configs[key] = h.id


def test_prose_cites_exactly_the_handshapes_and_signs_its_segments_use(source):
    chart = {h.id for h in source.handshapes}
    for sign in source.signs:
        cited = {token for token in re.findall(r"'([^']+)'", sign.prose) if token in chart}
        own = {hand.handshape for seg in sign.segments if seg.ref is None
               for hand in (seg.right, seg.left) if hand is not None}
        assert cited == own, f"{sign.gloss}: prose cites {sorted(cited)}, segments use {sorted(own)}"
        for seg in sign.segments:
            if seg.ref is not None:
                assert seg.ref.replace("_", " ").upper() in sign.prose, \
                    f"{sign.gloss}: prose does not name the referenced sign {seg.ref!r}"
    assert sum("'5' handshape" in s.prose for s in source.signs) >= 1


def test_notes_hold_etymology_homophones_and_usage(source):
    notes = [note for s in source.signs for note in s.notes]
    for label in ("Etymology:", "Homophone:", "Usage:"):
        assert sum(note.startswith(label) for note in notes) >= 3, label
    for sign in source.signs:
        for note in sign.notes:
            assert _squash(note) not in _squash(sign.prose), sign.gloss


def _differences(source: SignSource, a: str, b: str) -> set[str] | None:
    """Fields in which two signs' expanded segments differ, or None if their shapes differ."""
    seg_a, seg_b = source.expanded_segments(a), source.expanded_segments(b)
    if len(seg_a) != len(seg_b):
        return None
    diffs: set[str] = set()
    for x, y in zip(seg_a, seg_b):
        for part in ("mouth", "face", "head", "body"):
            if getattr(x, part) != getattr(y, part):
                diffs.add(part)
        for side in ("right", "left"):
            hx, hy = getattr(x, side), getattr(y, side)
            if (hx is None) != (hy is None):
                return None
            if hx is not None:
                for field, value in hx.model_dump().items():
                    if value != getattr(hy, field):
                        diffs.add(f"hand.{field}")
    return diffs


def test_minimal_pairs_exist(source):
    handshape_only, nonmanual_only = [], []
    for a, b in itertools.combinations([s.gloss for s in source.signs], 2):
        diffs = _differences(source, a, b)
        if not diffs:
            continue
        if diffs == {"hand.handshape"}:
            handshape_only.append((a, b))
        elif diffs <= {"mouth", "face"}:
            nonmanual_only.append((a, b))
    assert len(handshape_only) >= 2, handshape_only
    assert len(nonmanual_only) >= 2, nonmanual_only


def test_two_handed_and_head_body_signs_exist(source):
    two_handed = [s for s in source.signs if any(seg.right and seg.left for seg in s.segments)]
    head_body = [s for s in source.signs
                 if any(seg.head != "none" or seg.body != "none" for seg in s.segments)]
    assert len(two_handed) >= 5 and len(head_body) >= 4


def test_bad_source_errors_name_the_file_and_the_sign(tmp_path):
    text = (KB / "demo_signs.yaml").read_text(encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace('{handshape: "Y", location: ear', '{handshape: "Q", location: ear'),
                   encoding="utf-8")
    with pytest.raises(SignSourceError) as err:
        load_sign_source(bad)
    assert str(bad) in str(err.value) and "telephone" in str(err.value) and "'Q'" in str(err.value)


def test_non_latin1_text_is_refused_naming_the_field(source):
    broken = source.model_copy(update={"signs": [
        source.signs[0].model_copy(update={"prose": "Cross the fists \u2014 then press."}),
        *source.signs[1:],
    ]})
    with pytest.raises(rd.RenderError, match=r"sign 'love' prose"):
        rd.render_dictionary_pdf(broken)


# --------------------------------------------------------------------------------------------
# The committed English PDF
# --------------------------------------------------------------------------------------------

def test_committed_pdf_has_disclaimer_chart_and_every_entry_in_order(source):
    pages = _pdf_pages(KB / rd.PDF_EN)
    assert len(pages) >= 4, "the dictionary should span several pages"
    assert _squash(source.disclaimer) in _squash(pages[0])

    lines = [line.strip() for page in pages for line in page.splitlines()]
    for shape in source.handshapes:
        assert rd.chart_heading(shape.id, shape.name) in lines, shape.id
    chart_at = lines.index("Handshape chart")
    entries_at = lines.index("Entries")
    assert chart_at < entries_at

    positions = []
    for sign in source.signs:
        word = rd.headword(sign)
        assert word in lines[entries_at:], f"headword {word!r} is not on a line of its own"
        positions.append((sign.gloss.casefold(), lines.index(word, entries_at)))
    assert [p for _, p in sorted(positions)] == sorted(p for _, p in positions), "entries not alphabetical"


def test_committed_pdf_keeps_each_entry_whole_and_readable(source):
    pages = [_squash(page) for page in _pdf_pages(KB / rd.PDF_EN)]
    for sign in source.signs:
        # Headword immediately followed by its prose, on one page: clean text, no hyphenation,
        # no ligature glyphs, and a chunker can keep the entry with its headword.
        entry = f"{rd.headword(sign)} {_squash(sign.prose)}"
        holders = [i for i, page in enumerate(pages) if entry in page]
        assert len(holders) == 1, f"{sign.gloss}: entry text not found intact"
        page = pages[holders[0]]
        for note in sign.notes:
            assert f"{rd.NOTES_LABEL} " in page and _squash(note) in page, sign.gloss


# --------------------------------------------------------------------------------------------
# The Chinese source and PDF
# --------------------------------------------------------------------------------------------

def test_zh_entries_use_exact_slr500_glosses_and_chinese_punctuation(zh_source):
    slr = _vocab("slr500.csv")
    assert 6 <= len(zh_source.entries) <= 12
    for entry in zh_source.entries:
        row = slr[entry.class_id]
        assert (entry.gloss_zh, entry.gloss_en) == (row["ZH"], row["EN"]), entry.class_id
        assert entry.prose.endswith("。") and "，" in entry.prose, entry.gloss_zh
    everything = "".join(e.prose + "".join(e.notes) for e in zh_source.entries)
    for mark in "。；！？":
        assert mark in everything, mark


def test_zh_source_errors_name_the_file(tmp_path):
    bad = tmp_path / "zh.yaml"
    bad.write_text("title: t\ndisclaimer: d\nentries:\n  - class_id: 1\n    gloss_zh: 前途\n", encoding="utf-8")
    with pytest.raises(rd.RenderError) as err:
        rd.load_zh_source(bad)
    assert str(bad) in str(err.value) and "gloss_en" in str(err.value)


def test_committed_zh_pdf_extracts_every_chinese_gloss(zh_source):
    pages = _pdf_pages(KB / rd.PDF_ZH)
    text = "\n".join(pages)
    lines = [line.strip() for line in text.splitlines()]
    nospace = "".join(text.split())
    assert "".join(zh_source.disclaimer.split()) in "".join(pages[0].split())
    for entry in zh_source.entries:
        assert entry.gloss_zh in lines, f"headword {entry.gloss_zh!r} not on a line of its own"
        # CJK lines wrap mid-sentence, so compare without whitespace.
        assert "".join(entry.prose.split()) in nospace, entry.gloss_zh
        for note in entry.notes:
            assert "".join(note.split()) in nospace, entry.gloss_zh


# --------------------------------------------------------------------------------------------
# The renderer
# --------------------------------------------------------------------------------------------

def test_rerender_is_byte_identical_to_the_committed_files(tmp_path):
    # No skip when the font is missing: find_cjk_font raises, naming the package to install.
    written = rd.render_all(tmp_path)
    for name, path in written.items():
        assert path.read_bytes() == (KB / name).read_bytes(), \
            f"{name} differs from the committed file: re-run python -m demo.render_dictionary and commit"


def test_missing_cjk_font_names_the_package(tmp_path):
    with pytest.raises(rd.RenderError, match=rd.CJK_FONT_PACKAGE):
        rd.find_cjk_font(tmp_path / "no-such-font.ttc")
    assert rd.main(["--out-dir", str(tmp_path / "out"), "--cjk-font", str(tmp_path / "none.ttf")]) == 1
    assert not (tmp_path / "out").exists(), "nothing is written when the font is missing"
