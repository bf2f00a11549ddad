"""Vocabulary loading: the real AUTSL/SLR500 files as they are, and clear errors for bad files."""

from pathlib import Path

import pytest

from gsp.settings import PROJECT_ROOT
from gsp.vocab import VocabError, load_vocabulary

VOCAB_DIR = PROJECT_ROOT / "data" / "vocab"  # the real AUTSL/SLR500 lists, vendored


def test_autsl_is_turkish_with_english_translation():
    vocab = load_vocabulary(VOCAB_DIR / "autsl.csv")
    assert len(vocab.entries) == 226
    first = vocab.entries[0]
    assert (first.label, first.gloss, first.lang, first.english) == (0, "abla", "tr", "sister")
    meal = next(e for e in vocab.entries if e.gloss == "afiyet_olsun")
    assert meal.query_forms() == ["enjoy your meal", "afiyet olsun"]
    assert meal.describe() == "enjoy your meal (Turkish gloss: afiyet_olsun)"


def test_slr500_is_chinese():
    vocab = load_vocabulary(VOCAB_DIR / "slr500.csv")
    assert len(vocab.entries) == 500
    e = vocab.entries[2]
    assert (e.gloss, e.lang, e.english) == ("形势", "zh", "SITUATION")
    assert e.query_forms() == ["SITUATION", "形势"]


def test_select_labels_and_limit(tmp_path):
    vocab = load_vocabulary(VOCAB_DIR / "autsl.csv")
    assert [e.label for e in vocab.select([9, 1, 5])] == [1, 5, 9]
    assert [e.label for e in vocab.select(limit=2)] == [0, 1]
    with pytest.raises(VocabError, match=r"labels \[9999\]"):
        vocab.select([9999])


def _write(tmp_path: Path, text: str | bytes, name="v.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


def test_english_only_and_gloss_column(tmp_path):
    v = load_vocabulary(_write(tmp_path, "ClassId,EN\n3,thank_you\n1,hello\n"))
    assert [(e.label, e.gloss, e.lang, e.english) for e in v.entries] == [(1, "hello", "en", None),
                                                                          (3, "thank_you", "en", None)]
    v = load_vocabulary(_write(tmp_path, "label,gloss,lang\n0,Hallo,de\n", "g.csv"))
    assert (v.entries[0].gloss, v.entries[0].lang) == ("Hallo", "de")


@pytest.mark.parametrize("text, message", [
    ("TR,EN\nabla,sister\n", "missing id column"),
    ("ClassId,Notes\n0,xx yy\n", "unknown column 'Notes' in the header; accepted: an id column"),
    ("ClassId\n0\n", "missing gloss column"),
    ("ClassId,TR,EN\n0,abla,sister\n0,acele,hurry\n", r"row 3: duplicate ClassId 0 \(first on row 2\)"),
    ("ClassId,TR,EN\n0,abla,sister\n1,,hurry\n", r"row 3: empty gloss in column 'TR' \(label 1\)"),
    ("ClassId,TR,EN\nx,abla,sister\n", r"row 2: ClassId 'x' is not an integer"),
    ("ClassId,TR,EN\n", "no signs"),
    ("", "empty file"),
])
def test_bad_vocabularies_name_file_row_and_field(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(VocabError, match=message) as info:
        load_vocabulary(path)
    assert str(path) in str(info.value)


def test_unknown_encoding_is_a_clear_error(tmp_path):
    path = _write(tmp_path, "ClassId,TR,EN\n0,ağabey,brother\n".encode("iso-8859-9"))
    with pytest.raises(VocabError, match=r"not UTF-8 text .* line 2"):
        load_vocabulary(path)


def test_utf16_with_bom_is_read(tmp_path):
    path = _write(tmp_path, "ClassId,ZH,EN\n0,情况,CONDITION\n".encode("utf-16"))
    assert load_vocabulary(path).entries[0].gloss == "情况"


def test_missing_file(tmp_path):
    with pytest.raises(VocabError, match="cannot read"):
        load_vocabulary(tmp_path / "nope.csv")
