"""gsp: knowledge base, generative sign-description prompts (GSP) and the `gsp` CLI."""

__version__ = "0.1.0"
