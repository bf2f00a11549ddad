"""The LLM layer: :mod:`gsp.llm.client` (OpenAI-compatible client with limits, retries, circuit
breaker and structured output), :mod:`gsp.llm.transport` (its HTTP: httptools for plain http to a
directly reached server, httpx2 for TLS and proxies), :mod:`gsp.llm.cache` (the response cache),
:mod:`gsp.llm.structured` (structured-output modes, parsing, validation) and
:mod:`gsp.llm.server` (the embedded local llama.cpp server).

Import names from those modules. The package itself imports nothing: :mod:`gsp.settings` needs
only :mod:`gsp.llm.structured` (the modes), and the client imports the settings.
"""
