"""Vocabulary files: the list of signs to describe.

Accepted as they are:

- ``ClassId,TR,EN`` (AUTSL): the native gloss is Turkish (lang ``tr``), EN its translation;
- ``ClassId,ZH,EN`` (SLR500): the native gloss is Chinese (lang ``zh``);
- ``ClassId,EN`` (English only, lang ``en``);
- ``ClassId,gloss[,lang][,EN]``: an explicit gloss column with an optional language column.

The id column may be called ``ClassId``, ``class_id``, ``label`` or ``id``. A language column is
named by its ISO 639-1 code (any case), and only the codes in :data:`LANGUAGE_NAMES` are known:
the languages of the benchmark datasets (AUTSL ``tr``, SLR500 ``zh``, WLASL/MS-ASL ``en``) and of
other public sign-language word lists (DGS ``de``, LSF ``fr``, LSA64 ``es``, Libras ``pt``, LIS
``it``, NGT ``nl``, PJM ``pl``, GSL ``el``, RSL ``ru``, ArSL ``ar``, JSL ``ja``, KSL ``ko``, ISL
``hi``). Any other column name (``Foo``, ``Notes``, a misspelt ``ClasID``) is refused naming the
column and the accepted names, rather than being guessed at: a guessed language would be written
into every prompt and artifact. No language-code library is a dependency of the project, hence the
explicit table; a new language is one line in it. The *native* gloss (the dataset's own word) is
what the artifacts record as ``gloss``; the English translation travels with it to the prompts
and to retrieval (the demo dictionary's headwords are English; a Chinese dictionary's are Chinese,
so retrieval searches both forms).
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from gsp.errors import GspError

ID_COLUMNS = ("classid", "class_id", "label", "id")
#: Known language codes (ISO 639-1) and the names the prompts use; see the module docstring.
LANGUAGE_NAMES = {"en": "English", "tr": "Turkish", "zh": "Chinese", "de": "German", "fr": "French",
                  "es": "Spanish", "pt": "Portuguese", "it": "Italian", "nl": "Dutch", "pl": "Polish",
                  "el": "Greek", "ar": "Arabic", "ru": "Russian", "ja": "Japanese", "ko": "Korean",
                  "hi": "Hindi"}
GLOSS_COLUMNS = ("gloss", "lang")
#: ``lang`` value for a non-English gloss whose language the file does not say.
UNKNOWN_LANG = "und"


class VocabError(GspError, ValueError):
    """The vocabulary file is unusable; the message names the file, row and field."""


@dataclass(frozen=True)
class VocabEntry:
    label: int
    gloss: str          # the native gloss, as the dataset spells it
    lang: str           # language code of ``gloss``
    english: str | None  # English translation (None when the gloss is English)
    row: int            # 1-based line number in the file, for error messages

    @property
    def english_text(self) -> str:
        """The English form with dataset underscores turned into spaces ('enjoy_your_meal')."""
        return (self.english or (self.gloss if self.lang == "en" else "")).replace("_", " ").strip()

    @property
    def native_text(self) -> str:
        return self.gloss.replace("_", " ").strip()

    def query_forms(self) -> list[str]:
        """Retrieval queries: the English form and the native form, without duplicates."""
        forms: list[str] = []
        for form in (self.english_text, self.native_text):
            if form and form.lower() not in {f.lower() for f in forms}:
                forms.append(form)
        return forms

    def describe(self) -> str:
        """The gloss as the prompts show it, e.g. 'sister (Turkish gloss: abla)'."""
        lang_name = LANGUAGE_NAMES.get(self.lang, self.lang)
        if self.lang == "en" or not self.english:
            return f"{self.native_text} ({lang_name} gloss)"
        return f"{self.english_text} ({lang_name} gloss: {self.gloss})"


@dataclass(frozen=True)
class Vocabulary:
    path: Path
    sha256: str
    entries: tuple[VocabEntry, ...]

    def select(self, labels: list[int] | None = None, limit: int | None = None) -> list[VocabEntry]:
        """The entries to run: a label subset (unknown labels are an error) and/or the first ``limit``."""
        entries = list(self.entries)
        if labels:
            by_label = {e.label: e for e in entries}
            unknown = [lab for lab in labels if lab not in by_label]
            if unknown:
                raise VocabError(f"{self.path}: labels {unknown} are not in the vocabulary")
            wanted = set(labels)
            entries = [e for e in entries if e.label in wanted]
        if limit is not None:
            entries = entries[: max(limit, 0)]
        return entries


def _decode(path: Path, data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise VocabError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}); "
            "re-save the file as UTF-8"
        ) from exc


def accepted_columns() -> str:
    """The accepted header names, as error messages list them."""
    return (f"an id column ({', '.join(('ClassId',) + ID_COLUMNS[1:])}), {', '.join(GLOSS_COLUMNS)}, "
            f"or a language code ({', '.join(c.upper() for c in LANGUAGE_NAMES)})")


def _check_column_names(path: Path, header: list[str]) -> None:
    """Refuse unknown and repeated column names. Unnamed columns (a trailing comma) carry nothing
    and are ignored."""
    known = set(ID_COLUMNS) | set(GLOSS_COLUMNS) | set(LANGUAGE_NAMES)
    unknown = [h for h in header if h and h.lower() not in known]
    if unknown:
        names = ", ".join(repr(h) for h in unknown)
        raise VocabError(f"{path}: unknown column{'s' if len(unknown) > 1 else ''} {names} in the header; "
                         f"accepted: {accepted_columns()}")
    lower = [h.lower() for h in header if h]
    repeated = sorted({h for h in lower if lower.count(h) > 1})
    if repeated:
        raise VocabError(f"{path}: column {repeated[0]!r} appears more than once in the header {header}")


def _columns(path: Path, header: list[str]) -> tuple[int, int | None, int | None, int | None, list[int]]:
    """Positions of the id, gloss, lang and EN columns and of the native-language columns."""
    _check_column_names(path, header)
    lower = [h.lower() for h in header]
    id_col = next((lower.index(c) for c in ID_COLUMNS if c in lower), None)
    if id_col is None:
        raise VocabError(f"{path}: missing id column (one of ClassId, class_id, label, id); header is {header}")
    gloss_col = lower.index("gloss") if "gloss" in lower else None
    lang_col = lower.index("lang") if "lang" in lower else None
    en_col = lower.index("en") if "en" in lower else None
    native_cols = [i for i, h in enumerate(lower) if i not in (id_col, en_col) and h in LANGUAGE_NAMES]
    if lang_col is not None and gloss_col is None:
        raise VocabError(f"{path}: a 'lang' column says the language of a 'gloss' column, and there is none; "
                         f"header is {header}")
    if gloss_col is None and not native_cols and en_col is None:
        raise VocabError(f"{path}: missing gloss column (a language column such as TR, ZH, EN, or 'gloss'); "
                         f"header is {header}")
    if gloss_col is None and len(native_cols) > 1:
        raise VocabError(f"{path}: several native gloss columns {[header[i] for i in native_cols]}; "
                         "keep one (plus EN) or add a 'gloss' column")
    return id_col, gloss_col, lang_col, en_col, native_cols


def load_vocabulary(path: Path | str) -> Vocabulary:
    """Read and check a vocabulary CSV. Every problem found is reported at once."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VocabError(f"{path}: cannot read vocabulary: {exc}") from exc
    text = _decode(path, data)
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise VocabError(f"{path}: empty file (expected a header such as ClassId,TR,EN)") from None
    lower = [h.lower() for h in header]
    id_col, gloss_col, lang_col, en_col, native_cols = _columns(path, header)

    entries: list[VocabEntry] = []
    errors: list[str] = []
    seen: dict[int, int] = {}
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(header):
            row = row + [""] * (len(header) - len(row))
        raw_id = row[id_col].strip()
        try:
            label = int(raw_id)
        except ValueError:
            errors.append(f"row {lineno}: {header[id_col]} {raw_id!r} is not an integer")
            continue
        if label in seen:
            errors.append(f"row {lineno}: duplicate {header[id_col]} {label} (first on row {seen[label]})")
            continue
        seen[label] = lineno
        english = row[en_col].strip() if en_col is not None else ""
        if gloss_col is not None:
            gloss, field = row[gloss_col].strip(), header[gloss_col]
            given = row[lang_col].strip().lower() if lang_col is not None else ""
            lang = given or ("en" if not english else UNKNOWN_LANG)
            if lang not in LANGUAGE_NAMES and lang != UNKNOWN_LANG:
                errors.append(f"row {lineno}: {header[lang_col]} {lang!r} is not a known language code "
                              f"(one of {', '.join(LANGUAGE_NAMES)}, or empty)")
                continue
        elif native_cols:
            gloss, field = row[native_cols[0]].strip(), header[native_cols[0]]
            lang = lower[native_cols[0]]
        else:
            gloss, field, lang = english, header[en_col], "en"
        if not gloss:
            errors.append(f"row {lineno}: empty gloss in column {field!r} (label {label})")
            continue
        entries.append(VocabEntry(label=label, gloss=gloss, lang=lang,
                                  english=(english or None) if lang != "en" else None, row=lineno))
    if errors:
        shown = "; ".join(errors[:20]) + (f"; … {len(errors) - 20} more" if len(errors) > 20 else "")
        raise VocabError(f"{path}: {len(errors)} bad row(s): {shown}")
    if not entries:
        raise VocabError(f"{path}: no signs (only a header)")
    entries.sort(key=lambda e: e.label)
    return Vocabulary(path=path, sha256=hashlib.sha256(data).hexdigest(), entries=tuple(entries))
