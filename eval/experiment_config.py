"""The engine settings every experiment starts from (the per-task configs live in
their modules: eval/locality.py, eval/nested_ttft.py, eval/rag_ttft.py).

Experiment configs embed `EngineConfig` itself as their `engine` section, with
this value as the default: a preset's `engine:` keys are set over it (keys it
leaves out keep these values), and EngineConfig's own checks run at load time.
"""

from __future__ import annotations

from spanjax.engine.engine import EngineConfig

# Larger than EngineConfig's serving defaults: experiments batch many questions at once.
EXPERIMENT_ENGINE = EngineConfig(
    num_pages=4096,  # SmolLM2: ~0.7 MB of fp32 KV per 16-token page
    max_tokens_per_step=512,
    max_seqs_per_step=64,
)
