"""`spanjax run CONFIG [overrides]`: load a YAML preset by its `task` field,
apply dotted overrides, open a run directory and run the task.

    from eval.experiments import load_config, run
    cfg = load_config("configs/locality_nq.yaml", ["eval.num_docs=10"])
    results, run_dir = run(cfg)

Tasks: `locality` (eval/locality.py; nq and kv), `ttft_nested`
(eval/nested_ttft.py) and `ttft_rag` (eval/rag_ttft.py, configured here).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Literal

from eval.runs import RunDir, open_run, write_results
from spanjax import config as C


# ---------------------------------------------------------------------------- ttft_rag


@dataclasses.dataclass(frozen=True)
class RagEval:
    docs: int = 16
    doc_tokens: int = 256
    trials: int = 5
    positions: Literal["sequential", "parallel"] = "parallel"

    def __post_init__(self):
        if self.docs < 1 or self.doc_tokens < 1 or self.trials < 1:
            raise ValueError("docs, doc_tokens and trials must be >= 1")


@dataclasses.dataclass(frozen=True)
class RagEngine:
    """The two engine knobs eval/rag_ttft.py exposes (it sizes the pool itself)."""

    page_size: int = 16
    max_tokens_per_step: int = 512


@dataclasses.dataclass(frozen=True)
class RagConfig:
    task: Literal["ttft_rag"] = "ttft_rag"
    name: str = "ttft_rag"
    model: str = "smollm2-135m"
    seed: int = 0
    out_dir: str = "runs"
    engine: RagEngine = RagEngine()
    eval: RagEval = RagEval()


def run_rag(cfg: RagConfig, run_dir: RunDir, model=None) -> dict:
    from eval import rag_ttft

    if model is not None:
        raise C.ConfigError("ttft_rag loads its model by name (cfg.model)")
    ev = cfg.eval
    # rag_ttft writes its per-trial JSON under the run directory (rag_ttft-<ts>/).
    summary = rag_ttft.run(cfg.model, ev.docs, ev.doc_tokens, ev.trials, ev.positions, cfg.seed, str(run_dir.path),
                           cfg.engine.page_size, cfg.engine.max_tokens_per_step)
    results = {"task": "ttft_rag", "name": cfg.name, **summary}
    write_results(run_dir, results)
    run_dir.log.info("RAG TTFT: span %.1f ms, stock %.1f ms, ratio %.1fx", summary["span_ttft_median_s"] * 1e3,
                     summary["stock_ttft_median_s"] * 1e3, summary["speedup"])
    return results


# ---------------------------------------------------------------------------- registry

# task -> (module, config class, run function); imported lazily.
TASKS = {
    "locality": ("eval.locality", "LocalityConfig", "run"),
    "ttft_nested": ("eval.nested_ttft", "NestedConfig", "run"),
    "ttft_rag": ("eval.experiments", "RagConfig", "run_rag"),
}


def _task(name: str):
    if name not in TASKS:
        raise C.ConfigError(f"task: unknown task {name!r}; expected one of {sorted(TASKS)}")
    mod, cls, fn = TASKS[name]
    m = importlib.import_module(mod)
    return getattr(m, cls), getattr(m, fn)


def config_class(data: dict):
    task = data.get("task")
    if task is None:
        raise C.ConfigError(f"missing required key 'task' (one of {sorted(TASKS)})")
    return _task(task)[0]


def load_config(path: str | Path, overrides=()):
    """The preset at `path` with overrides, as its task's frozen config class."""
    data = C.apply_overrides(C.read_yaml(path), overrides)
    cls = config_class(data)
    return C.from_dict(cls, data)


def run(cfg, resume: str | Path | None = None, model=None) -> tuple[dict, RunDir]:
    """Run a loaded config in a new run dir (or resume one); returns (results, run dir)."""
    _, fn = _task(cfg.task)
    scope = getattr(importlib.import_module(TASKS[cfg.task][0]), "RESUMABLE_SCOPE", ())
    run_dir = open_run(cfg, resume, scope)
    try:
        results = fn(cfg, run_dir, model=model)
    except KeyboardInterrupt:
        run_dir.log.warning("interrupted; finished items are kept. Resume with: spanjax run %s/config.yaml --resume %s", run_dir.path, run_dir.path)
        raise
    run_dir.log.info("results: %s", run_dir.path / "results.json")
    return results, run_dir
