"""`spanjax run CONFIG [overrides]`: load a YAML preset by its `task` field,
apply dotted overrides, open a run directory and run the task.

    from spanjax.eval.experiments import load_config, run
    cfg = load_config("configs/locality_nq.yaml", ["eval.num_docs=10"])
    results, run_dir = run(cfg)

Tasks: `locality` (eval/locality.py; nq and kv), `ttft_nested`
(eval/nested_ttft.py) and `ttft_rag` (eval/rag_ttft.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from spanjax import config as C
from spanjax.runs import RunDir, open_run

# ---------------------------------------------------------------------------- registry

# task -> (module, config class, run function); imported lazily.
TASKS = {
    "locality": ("spanjax.eval.locality", "LocalityConfig", "run"),
    "ttft_nested": ("spanjax.eval.nested_ttft", "NestedConfig", "run"),
    "ttft_rag": ("spanjax.eval.rag_ttft", "RagConfig", "run"),
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
        run_dir.log.warning(
            "interrupted; finished items are kept. Resume with: spanjax run %s/config.yaml --resume %s",
            run_dir.path,
            run_dir.path,
        )
        raise
    run_dir.log.info("results: %s", run_dir.path / "results.json")
    return results, run_dir
