"""Splitting dictionary pages into retrieval chunks that keep an entry with its headword.

A page is first cut into *entries* at headword lines (a line that is only a headword, e.g.
``LOVE (sevmek)`` or ``形势``). An entry that fits in ``chunk_size`` becomes one chunk; a longer
one is split by langchain's recursive splitter at paragraph, line, then sentence punctuation —
CJK (。！？；) as well as Latin — keeping the punctuation at the end of the chunk. Every chunk
remembers its headword (also across a page break) and its character span in the page text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from langchain_text_splitters import RecursiveCharacterTextSplitter

#: A headword line: an upper-case Latin gloss or a short CJK gloss, optionally followed by a
#: parenthesised translation. Overridable with GSP_KB_HEADWORD_PATTERN for other layouts.
DEFAULT_HEADWORD_PATTERN = (
    r"^(?:(?:[A-ZÇĞİÖŞÜ0-9][A-ZÇĞİÖŞÜ0-9 '’_/\-]{0,48}"
    r"|[\u3400-\u4dbf\u4e00-\u9fff]{1,10})"
    r"(?:\s*[\(（][^()（）\n]{1,60}[\)）])?"
    # A handshape-chart line: 'ID' - Name
    r"|'[^'\n]{1,12}' [-–] [^\n]{1,40})\s*$"
)
_CHART_LINE = re.compile(r"^'(?P<id>[^'\n]{1,12})' [-–] (?P<name>[^\n]{1,40}?)\s*$")

SEPARATORS = [
    "\n\n",
    "\n",
    "。", "！", "？", "；",
    ". ", "! ", "? ", "; ",
    "，", ", ",
    " ",
    "",
]


@dataclass(frozen=True)
class Chunk:
    page: int
    ordinal: int  # position within the document, 0-based
    start: int  # character span in the page text
    end: int
    text: str
    headword: str | None
    aliases: tuple[str, ...] = ()  # other names on the headword line, e.g. the native gloss


def _headword_of(line: str) -> tuple[str, tuple[str, ...]]:
    """Main headword and the aliases given in parentheses: ``LOVE (sevmek)`` → LOVE, (sevmek,).
    A chart line ``'5' - Spread hand`` → 5, ("5 handshape", "Spread hand"), the names entries cite."""
    chart = _CHART_LINE.match(line.strip())
    if chart:
        shape = chart.group("id")
        return shape, (f"{shape} handshape", chart.group("name").strip())
    main = re.split(r"\s*[\(（]", line.strip(), maxsplit=1)[0].strip()
    inner = re.findall(r"[\(（]([^()（）]+)[\)）]", line)
    aliases = tuple(a.strip() for part in inner for a in re.split(r"[,;/，；]", part) if a.strip())
    return main, aliases


def _split_head(head: tuple[str, tuple[str, ...]] | None) -> tuple[str | None, tuple[str, ...]]:
    return (None, ()) if head is None else head


class DictionaryChunker:
    def __init__(self, chunk_size: int = 800, chunk_overlap: int = 100, headword_pattern: str | None = None):
        if chunk_overlap >= chunk_size:
            raise ValueError(f"chunk_overlap ({chunk_overlap}) must be smaller than chunk_size ({chunk_size})")
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.headword_re = re.compile(headword_pattern or DEFAULT_HEADWORD_PATTERN, re.MULTILINE)

    def _splitter(self, size: int) -> RecursiveCharacterTextSplitter:
        return RecursiveCharacterTextSplitter(
            chunk_size=size,
            chunk_overlap=min(self.chunk_overlap, size // 2),
            separators=SEPARATORS,
            keep_separator="end",
            add_start_index=True,
            strip_whitespace=True,
        )

    def _split_long_entry(
        self, text: str, start: int, end: int, has_headline: bool, page_no: int,
        head: tuple[str, tuple[str, ...]] | None, first_ordinal: int,
    ) -> list[Chunk]:
        """Split an entry longer than chunk_size; its headword line stays on the first piece."""
        body_start = start
        if has_headline:
            line_end = text.find("\n", start, end)
            body_start = end if line_end == -1 else line_end + 1
        headline_len = body_start - start
        # The first piece carries the headline, so the pieces are sized to leave room for it.
        size = max(self.chunk_size - headline_len, self.chunk_size // 2)
        out: list[Chunk] = []
        for doc in self._splitter(size).create_documents([text[body_start:end]]):
            a = body_start + int(doc.metadata.get("start_index", 0))
            b = a + len(doc.page_content)
            if not out and has_headline:
                a = start
            out.append(Chunk(page_no, first_ordinal + len(out), a, b, text[a:b], *_split_head(head)))
        return out

    def _entries(self, text: str) -> list[tuple[int, int, tuple[str, tuple[str, ...]] | None]]:
        """(start, end, headword) spans; text before the first headword has headword None."""
        starts = [m.start() for m in self.headword_re.finditer(text) if m.group(0).strip()]
        bounds = sorted(set([0] + starts + [len(text)]))
        spans = []
        for a, b in zip(bounds, bounds[1:]):
            m = self.headword_re.match(text, a)
            head = _headword_of(m.group(0)) if (m and a in starts) else None
            spans.append((a, b, head))
        return spans

    def split_pages(self, pages: list[tuple[int, str]]) -> list[Chunk]:
        chunks: list[Chunk] = []
        current_head: tuple[str, tuple[str, ...]] | None = None
        for page_no, text in pages:
            for start, end, head in self._entries(text):
                if head is not None:
                    current_head = head
                body = text[start:end]
                if not body.strip():
                    continue
                if len(body.strip()) <= self.chunk_size:
                    lead = len(body) - len(body.lstrip())
                    piece = body.strip()
                    chunks.append(Chunk(page_no, len(chunks), start + lead, start + lead + len(piece), piece,
                                        *_split_head(current_head)))
                    continue
                chunks.extend(self._split_long_entry(text, start, end, head is not None, page_no, current_head,
                                                     len(chunks)))
        return chunks
