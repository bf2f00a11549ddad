"""The quality check of generated texts (gsp.quality) on real outputs: what the embedded SmolLM2
model stored as ``ok`` before the check existed must fail, and real descriptions — the demo
dictionary's prose in English and Chinese, the reference texts of every kind — must pass."""

import pytest
import yaml

from demo.reference_texts import reference_rows
from demo.sign_source import load_sign_source
from gsp.quality import MIN_WORDS, count_words, is_gloss_echo, text_problem, texts_problem
from gsp.settings import PROJECT_ROOT

KB = PROJECT_ROOT / "knowledge_base"

# Rows the embedded model produced for the demo vocabulary, stored with status ok (issue 8).
SMOLLM2_BAD = [
    ("Ts", "./home.json", ["tree"], "looks like a file path"),
    ("Ts", "treesignsigretextrange", ["tree"], "run together into one token"),
    ("Tp", '{"maxLength"', ["tree"], "looks like a JSON or code fragment"),
    ("Tg", "tree (English gloss)", ["tree"], "echoes the gloss"),
]


@pytest.mark.parametrize("kind, text, forms, reason", SMOLLM2_BAD)
def test_real_bad_outputs_of_the_embedded_model_fail(kind, text, forms, reason):
    problem = text_problem(text, kind, forms)
    assert problem is not None and reason in problem


@pytest.mark.parametrize("text, forms, reason", [
    ("See https://example.org/signs/tree for the sign.", ["tree"], "URL"),
    ("The hand moves as in www.signbank.org pictures.", ["tree"], "URL"),
    ("Use the file ../data/tree.yaml to perform it", ["tree"], "file path"),
    ("C:\\signs\\tree described in full here", ["tree"], "file path"),
    ('"description": "the right hand moves up"', ["tree"], "JSON"),
    ('["the right hand", "the left hand"] both move', ["tree"], "JSON"),
    ("<p>The right hand moves up twice</p>", ["tree"], "markup"),
    ("TREE", ["tree"], "echoes the gloss"),
    ("The sign for Tree.", ["tree"], "echoes the gloss"),
    ("sister (Turkish gloss: abla)", ["sister", "abla"], "echoes the gloss"),
    ("açıkmak", ["hungry", "acikmak"], "echoes the gloss"),  # the diacritics do not hide the echo
    ("饿（Chinese gloss）", ["hungry", "饿"], "echoes the gloss"),
    ("Hands move.", [], "too few words for Tb (at least 5)"),
    ("", [], "empty text"),
])
def test_each_kind_of_junk_is_named(text, forms, reason):
    problem = text_problem(text, "Tb", forms)
    assert problem is not None and reason in problem, problem


def test_demo_dictionary_prose_passes_as_every_whole_sign_kind():
    source = load_sign_source(KB / "demo_signs.yaml")
    assert len(source.signs) >= 40
    for sign in source.signs:
        for kind in ("Tb", "Ts", "Tg"):
            assert text_problem(sign.prose, kind, [sign.gloss, sign.native]) is None, (sign.gloss, sign.prose)


def test_chinese_prose_passes_without_spaces():
    entries = yaml.safe_load((KB / "demo_signs_zh.yaml").read_text(encoding="utf-8"))["entries"]
    assert entries
    for entry in entries:
        forms = [entry["gloss_zh"], entry["gloss_en"]]
        assert " " not in entry["prose"]
        for kind in ("Tb", "Tg", "Ts"):
            assert text_problem(entry["prose"], kind, forms) is None, entry["prose"]
    # short part-level clauses, as P4 splits them
    for part in ("同时点头", "同时双颊鼓起", "嘴微张", "一手握拳，拳心向下"):
        assert text_problem(part, "Tp", ["是", "YES"]) is None, part
    assert count_words("一手握拳，拳心向下") == 8
    assert count_words("点头") == 2
    assert text_problem("点头", "Tp", ["是"]) == "too few words for Tp (at least 3)"


def test_reference_texts_of_every_kind_pass():
    source = load_sign_source(KB / "demo_signs.yaml")
    rows = reference_rows(source)
    glosses = {s.class_id: [s.gloss, s.native] for s in source.signs}
    checked = 0
    for kind, kind_rows in rows.items():
        for row in kind_rows:
            assert text_problem(row["text"], kind, glosses[row["label"]]) is None, (kind, row["text"])
            checked += 1
    assert checked > 4 * len(source.signs)


@pytest.mark.parametrize("kind, text", [
    ("Tp", "A gentle smile."),
    ("Tp", "The right_hand taps the chin twice."),   # a body-part tag inside prose is not code
    ("Ts", "The index finger points to the '5' hand; palm faces left."),
    ("Tb", "Make the sign for MOTHER, then move the right '5' hand away from the chin in two arcs."),
    ("Tg", "Both hands, in the 'S' handshape, cross at the wrists over the chest [1] and press in once."),
    ("Tb", "Sağ el 'S' el şekliyle göğse iki kez dokunur."),
])
def test_realistic_good_texts_pass(kind, text):
    assert text_problem(text, kind, ["love", "sevmek", "mother"]) is None


def test_thresholds_per_kind_and_word_counting():
    assert MIN_WORDS["Tp"] < MIN_WORDS["Ts"] <= MIN_WORDS["Tb"] == MIN_WORDS["Tg"]
    four = "The palm faces down"
    assert text_problem(four, "Ts") is None and text_problem(four, "Tp") is None
    assert "too few words for Tb" in text_problem(four, "Tb")
    assert count_words("left-hand fingers don't move 2 times") == 5
    assert not is_gloss_echo("The tree sways: the right arm rises and the fingers spread.", ["tree"])


def test_texts_problem_names_the_text_and_which_one():
    good = "The right hand taps the chin twice."
    assert texts_problem([good, good], "Ts", ["mother"]) is None
    problem = texts_problem([good, "./home.json", good], "Ts", ["home"])
    assert problem == "quality: looks like a file path: './home.json' (text 2 of 3)"


def test_the_plain_word_shortcut_never_changes_the_echo_verdict():
    """is_gloss_echo stops at the first plain ASCII word that is neither gloss nor decoration; on
    random texts mixing diacritics, combining marks, Turkish i, CJK and underscores it must agree
    with the definition: every folded word is the gloss's or decoration, and one is the gloss's."""
    import random

    from gsp import quality
    from gsp.lexical import fold

    def by_definition(text, forms):
        gloss = {w for f in forms for w in quality._ECHO_TOKEN.findall(fold(f.replace("_", " ")))}
        words = quality._ECHO_TOKEN.findall(fold(text.replace("_", " ")))
        return (bool(gloss) and bool(words) and all(w in gloss or w in quality._DECORATION for w in words)
                and any(w in gloss for w in words))

    rng = random.Random(1)
    words = ["tree", "TREE", "the", "sign", "for", "English", "gloss", "Turkish", "abla", "sister", "açıkmak",
             "acikmak", "hungry", "饿", "情况", "CONDITION", "hand", "moves", "e\u0301", "café", "cafe", "İstanbul",
             "ıi", "x_y", "tree2", "２", "ﬁ"]
    seps = [" ", "", "(", ")", ":", "_", "-", "，", "（", "\u0301", "'", "’", "/"]
    forms = [("tree",), ("sister", "abla"), ("hungry", "acikmak"), ("hungry", "饿"), ("CONDITION", "情况"),
             ("cafe",), ("x y",)]
    echoes = 0
    for _ in range(20000):
        text = "".join(rng.choice(words) + rng.choice(seps) for _ in range(rng.randint(1, 5)))
        form = rng.choice(forms)
        verdict = is_gloss_echo(text, form)
        assert verdict == by_definition(text, form), (text, form)
        echoes += verdict
    assert echoes > 100  # both verdicts were exercised
