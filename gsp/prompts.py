"""Prompts P1–P4 (paper section 3.2) and P5 (confusion-driven refinement, beyond the paper):
loading the versioned files in ``prompts/``, rendering them, and the output shapes each one asks for.

A prompt file is YAML with ``id``, ``version``, ``produces``, ``notes`` (the design decisions),
``system`` and ``user`` templates. Templates are plain ``str.format`` strings; the variables each
prompt may use are listed in :data:`PROMPT_VARIABLES`. Every artifact row records the prompt's
``prompt_id`` (``P1.v1``) and ``prompt_sha`` (SHA-256 of the file), so editing a prompt shows in
the data.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gsp.errors import GspError
from gsp.llm.structured import inline_schema
from gsp.schema import BodyPart
from gsp.yamltext import YAMLError, load_yaml, yaml_problem

PROMPT_FILES = {"P1": "P1_primary.yaml", "P2": "P2_synonyms.yaml", "P3": "P3_refine.yaml", "P4": "P4_parts.yaml"}
#: P5 is loaded only by a refinement run (`gsp generate --refine-confused`), so a prompts folder
#: made for P1–P4 keeps working for every other run.
REFINE_PROMPT_FILES = {"P5": "P5_contrast.yaml"}
PROMPT_VARIABLES = {
    "P1": {"gloss", "passages", "schema", "review_note"},
    "P2": {"gloss", "k", "primary", "schema", "review_note"},
    "P3": {"gloss", "primary", "passages", "schema", "review_note"},
    "P4": {"gloss", "refined", "body_parts", "schema", "review_note"},
    "P5": {"gloss", "current", "passages", "other", "other_current", "other_passages", "schema", "review_note"},
}
#: The variable of a prompt file's ``review_note`` template: a reviewer's note on a rejected text.
NOTE_VARIABLE = "note"


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DescriptionOut(_Out):
    """P1 (Tb), P3 and P5 (Tg): one description."""

    description: str = Field(min_length=3, max_length=1500)


class SynonymsOut(_Out):
    """P2 (Ts): k variants; the schema is built per k (see :func:`synonyms_model`)."""

    variants: list[str]


class PartOut(_Out):
    text: str = Field(min_length=3, max_length=500)
    body_parts: list[BodyPart] = Field(min_length=1, max_length=5)


class PartsOut(_Out):
    """P4 (Tp): part-level texts, each tagged with the body parts it involves (many-to-many)."""

    parts: list[PartOut] = Field(min_length=1, max_length=8)


@cache
def synonyms_model(k: int) -> type[SynonymsOut]:
    """``{"variants": [str × k]}`` with the count in the schema (servers with schema support obey it).
    One class per ``k`` and process: pydantic takes ~0.3 ms to build one."""
    from typing import Annotated

    from pydantic import create_model

    variant = Annotated[str, Field(min_length=3, max_length=800)]
    return create_model(f"Synonyms{k}", __base__=SynonymsOut,
                        variants=(list[variant], Field(min_length=k, max_length=k)))


def output_model(prompt_key: str, k: int = 3) -> type[_Out]:
    if prompt_key == "P2":
        return synonyms_model(k)
    return {"P1": DescriptionOut, "P3": DescriptionOut, "P4": PartsOut, "P5": DescriptionOut}[prompt_key]


class PromptError(GspError, ValueError):
    """A prompt file is unreadable, incomplete or uses an unknown template variable."""


@dataclass(frozen=True)
class Prompt:
    key: str          # P1 … P5
    version: int
    produces: str     # Tb, Ts, Tg, Tp
    system: str
    user: str
    sha: str          # SHA-256 (hex, first 16) of the prompt file
    path: Path
    review_note: str = ""  # template of the block that carries a reviewer's note ({note})

    @property
    def prompt_id(self) -> str:
        return f"{self.key}.v{self.version}"

    def note_block(self, note: str | None) -> str:
        """The ``{review_note}`` variable: empty without a note, so a request without one is the
        same request (and cache entry) as before review existed."""
        if not note:
            return ""
        try:
            return self.review_note.format(**{NOTE_VARIABLE: note.strip()})
        except (KeyError, IndexError, ValueError) as exc:
            raise PromptError(f"{self.path}: cannot render review_note: {exc!r}") from exc

    def render(self, **variables: object) -> list[dict[str, str]]:
        """System + user messages with ``variables`` filled in (``review_note`` defaults to none)."""
        variables.setdefault("review_note", "")
        try:
            return [
                {"role": "system", "content": self.system.format(**variables).strip()},
                {"role": "user", "content": self.user.format(**variables).strip()},
            ]
        except (KeyError, IndexError, ValueError) as exc:
            raise PromptError(f"{self.path}: cannot render: {exc!r}") from exc


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def load_prompt(path: Path, key: str) -> Prompt:
    try:
        raw = path.read_bytes()
        data = load_yaml(raw.decode("utf-8"))
    except YAMLError as exc:
        raise PromptError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a mapping with id, version, produces, system, user")
    for field in ("id", "version", "produces", "system", "user"):
        if field not in data:
            raise PromptError(f"{path}: missing field {field!r}")
    if data["id"] != key:
        raise PromptError(f"{path}: id is {data['id']!r}, expected {key!r}")
    try:
        used = _template_fields(data["system"]) | _template_fields(data["user"])
    except ValueError as exc:
        raise PromptError(f"{path}: malformed template: {exc}") from exc
    unknown = used - PROMPT_VARIABLES[key]
    if unknown:
        raise PromptError(f"{path}: unknown template variable(s) {sorted(unknown)}; "
                          f"{key} may use {sorted(PROMPT_VARIABLES[key])}")
    note = _review_note_template(path, data, used)
    return Prompt(key=key, version=int(data["version"]), produces=str(data["produces"]),
                  system=str(data["system"]), user=str(data["user"]),
                  sha=hashlib.sha256(raw).hexdigest()[:16], path=path, review_note=note)


def _review_note_template(path: Path, data: dict, used: set[str]) -> str:
    """The ``review_note`` field, checked: a prompt without it (or without ``{review_note}`` in a
    template) could not pass a rejected text's note on, and the rejected text would come back."""
    note = data.get("review_note")
    if note is None:
        raise PromptError(f"{path}: missing field 'review_note' (a template with {{{NOTE_VARIABLE}}}, "
                          "used when a reviewer rejected the text)")
    try:
        fields = _template_fields(str(note))
    except ValueError as exc:
        raise PromptError(f"{path}: malformed review_note template: {exc}") from exc
    if fields != {NOTE_VARIABLE} or "review_note" not in used:
        raise PromptError(f"{path}: review_note must use exactly {{{NOTE_VARIABLE}}}, and the system or "
                          "user template must contain {review_note}")
    return str(note)


def load_prompts(prompts_dir: Path, files: dict[str, str] = PROMPT_FILES) -> dict[str, Prompt]:
    """The prompts of ``files`` (default P1–P4; :data:`REFINE_PROMPT_FILES` for P5) from ``prompts_dir``."""
    return {key: load_prompt(Path(prompts_dir) / name, key) for key, name in files.items()}


@cache
def schema_text(model: type[BaseModel]) -> str:
    """The output schema as the prompts show it (every structured-output mode also states it).
    Once per model and process: pydantic takes 0.2-0.5 ms to build a model's JSON schema."""
    return json.dumps(inline_schema(model), ensure_ascii=False)
