"""Text extraction from dictionary PDFs, page by page, with one clear reason per bad file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pypdf import PdfReader
from pypdf.errors import FileNotDecryptedError, PdfReadError, PyPdfError

from gsp.errors import GspError

# pypdf logs recoverable syntax problems as warnings; we report per file instead.
logging.getLogger("pypdf").setLevel(logging.ERROR)

PDF_MAGIC = b"%PDF-"


class PdfExtractionError(GspError):
    """A document that cannot be indexed; ``reason`` is a short machine-readable tag."""

    def __init__(self, path: Path, reason: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Page:
    number: int  # 1-based, as printed in citations
    text: str


def extract_pages(path: Path) -> list[Page]:
    """Text of every page. Raises PdfExtractionError for: not a PDF, encrypted, corrupt,
    or no extractable text (a scan without a text layer)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError as exc:
        raise PdfExtractionError(path, "unreadable", f"cannot read file: {exc.strerror or exc}") from exc
    if PDF_MAGIC not in head:
        raise PdfExtractionError(path, "not_pdf", "not a PDF file (no %PDF- header)")
    try:
        reader = PdfReader(path, strict=False)
        if reader.is_encrypted:
            # An empty user password opens many "protected" PDFs; anything else needs the owner.
            try:
                if not reader.decrypt(""):
                    raise PdfExtractionError(path, "encrypted", "PDF is encrypted with a password")
            except (FileNotDecryptedError, NotImplementedError) as exc:
                raise PdfExtractionError(path, "encrypted", f"PDF is encrypted: {exc}") from exc
        pages = [Page(i + 1, (page.extract_text() or "")) for i, page in enumerate(reader.pages)]
    except PdfExtractionError:
        raise
    except FileNotDecryptedError as exc:
        raise PdfExtractionError(path, "encrypted", f"PDF is encrypted: {exc}") from exc
    except (PdfReadError, PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        # pypdf surfaces damaged structure as many exception types.
        raise PdfExtractionError(path, "corrupt", f"corrupt PDF: {type(exc).__name__}: {exc}") from exc
    if not pages:
        raise PdfExtractionError(path, "corrupt", "PDF has no pages")
    if not any(p.text.strip() for p in pages):
        raise PdfExtractionError(
            path, "no_text", f"no extractable text in {len(pages)} page(s) (scanned images need OCR first)"
        )
    return pages
