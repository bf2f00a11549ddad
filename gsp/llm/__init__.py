"""The LLM layer: OpenAI-compatible client with cache, limits, retries and structured output,
and the embedded local llama.cpp server."""

from gsp.llm.cache import ResponseCache, request_hash
from gsp.llm.client import (
    ChatResult,
    Endpoint,
    FatalLLMError,
    LLMCallError,
    LLMClient,
    StageUsage,
    endpoint_host,
)
from gsp.llm.server import LocalServer, LocalServerError, local_llm_server, smollm2_gguf_path
from gsp.llm.structured import OutputInvalid, inline_schema, parse_json, response_format, validate_output

__all__ = [
    "ChatResult", "Endpoint", "FatalLLMError", "LLMCallError", "LLMClient", "LocalServer", "LocalServerError",
    "OutputInvalid", "ResponseCache", "StageUsage", "endpoint_host", "inline_schema", "local_llm_server",
    "parse_json", "request_hash", "response_format", "smollm2_gguf_path", "validate_output",
]
