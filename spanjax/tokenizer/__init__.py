"""Tokenization and chat templates (Hugging Face directories and GGUF metadata)."""

from spanjax.tokenizer.chat_template import ChatTemplateError
from spanjax.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplateError", "Tokenizer"]
