"""LEADRE: generative ad recall — an LLM reads a user's prompt and generates the semantic IDs of ads."""

__version__ = "0.1.0"
