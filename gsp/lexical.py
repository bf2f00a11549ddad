"""Lexical matching for retrieval: tokenisation that works for English, Turkish and Chinese.

Dictionary lookups are mostly by headword, and the default embedding model only knows English,
so a Turkish or Chinese gloss must be found by its letters. Latin text is case-folded and
stripped of diacritics (AUTSL writes ``acikmak`` for *açıkmak*); CJK runs are segmented with
jieba's search mode (words plus their sub-words), so 形势 matches 形势 and 形势图 alike.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from functools import lru_cache

import jieba

jieba.setLogLevel(logging.WARNING)

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W_]+", re.UNICODE)
_CJK_RUN = re.compile(rf"^[{_CJK}]+$")
# Turkish dotless i and dotted capital I do not decompose under NFKD.
_FOLD_EXTRA = str.maketrans({"ı": "i", "İ": "i", "ß": "ss", "ø": "o", "đ": "d", "ł": "l"})


def fold(text: str) -> str:
    """Case-fold and strip diacritics from Latin letters; CJK is left as it is."""
    if text.isascii():  # exact: neither the table nor NFKD changes ASCII; the quality check's hot path
        return text.lower()
    text = text.translate(_FOLD_EXTRA).casefold()
    decomposed = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if not unicodedata.combining(c)))


@lru_cache(maxsize=4096)
def _cjk_tokens(run: str) -> tuple[str, ...]:
    words = [w for w in jieba.cut_for_search(run) if w.strip()]
    # Single characters too, so a one-character gloss still matches inside longer words.
    return tuple(dict.fromkeys(words + list(run)))


def tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    for match in _TOKEN.finditer(fold(text)):
        tok = match.group(0)
        if _CJK_RUN.match(tok):
            tokens.extend(_cjk_tokens(tok))
        else:
            tokens.append(tok)
    return tokens


def normalise_headword(text: str) -> str:
    """The comparable form of a headword or gloss: folded tokens joined by single spaces."""
    return " ".join(_TOKEN.findall(fold(text.replace("_", " "))))
