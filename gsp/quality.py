"""The quality check for generated texts: is this a description of a sign at all?

A schema-valid answer can still be junk: a small model fills a string field with a file path
(``./home.json``), a piece of the JSON schema (``{"maxLength"``), the gloss it was given
(``tree (English gloss)``) or one run-together token (``treesignsigretextrange``). Such texts would
be trained on as if they described the sign. :func:`text_problem` names what is wrong with one
text, or returns ``None``; the generator re-asks like it does for schema-invalid output and
records the reason when the answers stay bad.

The checks and every threshold live here and nowhere else. They are deliberately conservative:
each one matches something no description of a hand movement contains, so a good description in
English, Turkish or Chinese passes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

from gsp.lexical import fold
from gsp.vocab import LANGUAGE_NAMES

#: The fewest words a text of each kind may have. Tb/Tg describe a whole sign (handshape,
#: location, movement); a Ts variant rephrases one; a Tp text may be one short clause about one
#: part ("a gentle smile"). One CJK character counts as one word (see :func:`count_words`).
MIN_WORDS: dict[str, int] = {"Tb": 5, "Tg": 5, "Ts": 4, "Tp": 3}
#: A text that is one Latin token of at least this many letters is words run together.
RUN_TOGETHER_MIN_CHARS = 12

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_LATIN_WORD = re.compile(rf"[^\W\d_{_CJK}]+(?:['’-][^\W\d_{_CJK}]+)*")
_ECHO_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")

# What code and data look like, and prose never does: braces, a quoted JSON key, markup tags,
# backticks, an empty call, JSON/JavaScript literals.
_CODE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[{}]"), "a JSON or code fragment"),
    (re.compile(r"\"[A-Za-z_][\w-]*\"\s*:"), "a JSON fragment"),
    (re.compile(r"^\s*\[\s*[\"{\[]"), "a JSON fragment"),
    (re.compile(r"</?[A-Za-z][\w-]*\s*/?>"), "markup"),
    (re.compile(r"`"), "a code fragment"),
    (re.compile(r"\b[A-Za-z_]\w*\(\s*\)|\b(?:null|undefined|NaN)\b"), "a code fragment"),
)
_URL = re.compile(r"\b(?:https?|ftp|file)://|\bwww\.[\w-]+\.", re.I)
_FILE_EXTENSIONS = ("json", "jsonl", "yaml", "yml", "txt", "csv", "md", "py", "js", "html", "htm", "xml",
                    "pdf", "png", "jpg", "jpeg", "gif", "sh", "log", "ini", "cfg", "toml", "parquet", "exe")
_PATH = re.compile(
    r"(?:^|[\s(\"'])(?:\.{1,2}/|~/|/[\w.-]+/)"          # ./x, ../x, ~/x, /dir/x
    r"|\b[A-Za-z]:\\"                                    # C:\
    rf"|\b[\w-]+\.(?:{'|'.join(_FILE_EXTENSIONS)})\b",   # name.json
)
# Words a model wraps around an echoed gloss: "tree (English gloss)", "The sign for TREE".
_DECORATION = {"gloss", "glosses", "sign", "signs", "the", "a", "an", "for", "of", "word", "language",
               "meaning", "means", "is", "label", "description"} | {fold(n) for n in LANGUAGE_NAMES.values()}


def count_words(text: str) -> int:
    """Words in ``text``: Latin-script words (a hyphenated or apostrophised word is one) plus one
    per CJK character. Chinese and Japanese are written without spaces and a word there is one or
    two characters, so counting characters keeps a short Chinese clause (同时点头, "nod at the same
    time") at par with its English translation; digits are not words."""
    return len(_LATIN_WORD.findall(_CJK_CHAR.sub(" ", text))) + len(_CJK_CHAR.findall(text))


def _echo_tokens(text: str) -> list[str]:
    return _ECHO_TOKEN.findall(fold(text.replace("_", " ")))


@lru_cache(maxsize=4096)
def _gloss_words(gloss_forms: tuple[str, ...]) -> frozenset[str]:
    # cached: every answer for a sign is checked against the same forms (0.1 ms a request at 2,000)
    return frozenset(t for form in gloss_forms for t in _echo_tokens(form))


# A run of ASCII letters and digits between ASCII characters that are neither (or the text's ends):
# folding lowers it and leaves it one token, whatever the rest of the text holds.
_PLAIN_ASCII_WORD = re.compile(r"(?<![^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f])[A-Za-z0-9]+"
                               r"(?![^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f])")


def is_gloss_echo(text: str, gloss_forms: Iterable[str]) -> bool:
    """True when ``text`` says nothing but the gloss: its words are the gloss's words and words
    that only decorate it ("(English gloss)", "the sign for", a language name). Case, diacritics
    (``acikmak`` = *açıkmak*) and punctuation do not matter."""
    gloss_words = _gloss_words(tuple(gloss_forms))
    # Exact shortcut: one plain ASCII word that is neither the gloss's nor decoration settles it
    # without folding the whole text (the slow part for non-ASCII text: ~15 µs a text).
    for match in _PLAIN_ASCII_WORD.finditer(text):
        word = match.group().lower()
        if word not in gloss_words and word not in _DECORATION:
            return False
    words = _echo_tokens(text)
    if not gloss_words or not words:
        return False
    rest = [w for w in words if w not in gloss_words and w not in _DECORATION]
    return not rest and any(w in gloss_words for w in words)


def text_problem(text: str | None, kind: str, gloss_forms: Sequence[str] = ()) -> str | None:
    """What makes ``text`` unusable as a ``kind`` (Tb, Ts, Tg, Tp) description of the sign whose
    gloss has the forms ``gloss_forms`` — one short phrase starting with "looks like", "echoes" or
    "too few words" — or ``None`` when it passes. The first failing check wins, most specific
    first."""
    stripped = (text or "").strip()
    if not stripped:
        return "empty text"
    if _URL.search(stripped):
        return "looks like a URL"
    if _PATH.search(stripped):
        return "looks like a file path"
    for pattern, what in _CODE_PATTERNS:
        if pattern.search(stripped):
            return f"looks like {what}"
    if is_gloss_echo(stripped, gloss_forms):
        return "echoes the gloss instead of describing the sign"
    words = count_words(stripped)
    if (words <= 1 and not _CJK_CHAR.search(stripped)
            and len(re.sub(r"\W", "", stripped)) >= RUN_TOGETHER_MIN_CHARS):
        return "looks like words run together into one token"
    minimum = MIN_WORDS.get(kind, 1)
    if words < minimum:
        return f"too few words for {kind} (at least {minimum})"
    return None


QUALITY_PREFIX = "quality: "


def is_quality_failure(cause: str | None) -> bool:
    """Whether a failed row's cause (see gsp.generate.failure_cause) is a text this check rejected."""
    return bool(cause) and cause.startswith(QUALITY_PREFIX)


def quote(text: str, limit: int = 60) -> str:
    """A short, one-line rendering of a rejected text for error messages."""
    flat = " ".join((text or "").split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def texts_problem(texts: Sequence[str], kind: str, gloss_forms: Sequence[str] = ()) -> str | None:
    """The first problem among the texts of one answer (a Ts answer has k variants, a Tp answer
    several parts), as ``quality: <problem>: <the text>`` naming which one, or ``None``."""
    for i, text in enumerate(texts):
        problem = text_problem(text, kind, gloss_forms)
        if problem is not None:
            which = f" (text {i + 1} of {len(texts)})" if len(texts) > 1 else ""
            return f"{QUALITY_PREFIX}{problem}: {quote(text)}{which}"
    return None
