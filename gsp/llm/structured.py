"""Structured output: how the JSON shape is requested, and how answers are parsed and checked.

Three request modes, because servers disagree (``GSP_LLM_STRUCTURED_OUTPUT``):

- ``json_schema``: OpenAI's ``{"type": "json_schema", "json_schema": {...}}``;
- ``json_object``: plain JSON mode (Moonshot v1); the schema travels only in the prompt;
- ``json_object_schema``: ``{"type": "json_object", "schema": {...}}``, which llama.cpp's
  ``llama-server`` turns into a grammar (it takes the ``json_schema`` form too; llama-cpp-python's
  server, the embedded one before, answered that with HTTP 500); sent through :func:`grammar_safe`.

Whatever the mode, the answer is validated with pydantic; the prompt always states the schema too.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ValidationError

#: How the JSON shape is requested (see the module docstring); the settings accept exactly these.
StructuredMode = Literal["json_schema", "json_object", "json_object_schema"]
MODES: tuple[StructuredMode, ...] = get_args(StructuredMode)


class OutputInvalid(ValueError):
    """The model's answer is not JSON or not the requested shape (a re-ask may fix it)."""


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with ``$ref``s inlined and titles dropped: the plain form every
    server's schema support (and llama.cpp's grammar converter) understands."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items() if k != "title"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    inlined = resolve(schema)
    inlined.pop("description", None)  # the model's docstring: notes for developers, not the LLM
    return inlined


def response_format(mode: StructuredMode, name: str, schema: dict[str, Any]) -> dict[str, Any]:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": False}}
    if mode == "json_object":
        return {"type": "json_object"}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": grammar_safe(schema)}
    raise ValueError(f"unknown structured output mode {mode!r}; expected one of {MODES}")


def grammar_safe(schema: Any) -> Any:
    """The schema without string upper length bounds: llama.cpp unrolls ``maxLength`` into one
    grammar rule per character and its parser gives up (the server process crashes) beyond a few
    hundred. ``minLength`` stays: it is a few rules, and without it a small model answers with
    empty strings. pydantic still enforces both bounds on the answer."""
    if isinstance(schema, dict):
        return {k: grammar_safe(v) for k, v in schema.items()
                if not (k == "maxLength" and schema.get("type") == "string")}
    if isinstance(schema, list):
        return [grammar_safe(v) for v in schema]
    return schema


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_json(content: str | None) -> Any:
    """Lenient JSON parsing: code fences stripped, raw newlines inside strings allowed
    (llama.cpp's grammar lets them through), leading/trailing prose around one object ignored."""
    if content is None or not content.strip():
        raise OutputInvalid("empty answer")
    text = content.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text, strict=False)
    except json.JSONDecodeError as first:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(text[start : end + 1], strict=False)
            except json.JSONDecodeError:
                pass
        raise OutputInvalid(f"answer is not valid JSON: {first.msg} at char {first.pos}") from first


def validate_output(model: type[BaseModel], content: str | None) -> BaseModel:
    data = parse_json(content)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:8]
        )
        raise OutputInvalid(f"answer does not match the schema: {problems}") from exc
