"""Config sections shared by every experiment (the per-task configs live in
their modules: eval/locality.py, eval/nested_ttft.py, eval/experiments.py)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class EngineSection:
    """EngineConfig fields an experiment may set (see spanjax/engine/engine.py)."""

    num_pages: int = 4096  # SmolLM2: ~0.7 MB of fp32 KV per 16-token page
    page_size: int = 16
    max_tokens_per_step: int = 512
    max_seqs_per_step: int = 64
    max_running: int = 64
    attention: Literal["auto", "reference", "pallas"] = "auto"
    cache_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        self.build()  # EngineConfig's own checks, at load time rather than mid-run

    def build(self):
        from spanjax.engine.engine import EngineConfig

        return EngineConfig(**dataclasses.asdict(self))
