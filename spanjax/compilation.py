"""Compilation off the user's clock: JAX's persistent compilation cache, on by default,
and the seconds this process spends compiling (reported apart from TTFT).

Where the cache lives, in order: `EngineConfig.compilation_cache` (a directory, "off", or "on" for the default),
else `$SPANJAX_COMPILATION_CACHE` (the same), else `$XDG_CACHE_HOME/spanjax/jax-<version>`
(default `~/.cache/...`). The cache is keyed by JAX on the computation, the compiler
options and the device, so a second process running the same step shapes reads every
executable back instead of compiling it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.monitoring

ENV = "SPANJAX_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")
DEFAULT = ("", "on", "1", "true", "yes", "default")  # the default location, not a directory named "on"
# JAX's own duration events for one jit compilation: trace to jaxpr, lower to MLIR, and the
# backend compile (a persistent-cache read when it hits).
TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"

_seconds = {"trace_s": 0.0, "compile_s": 0.0}


def cache_dir(setting: str | None = None) -> Path | None:
    """The cache directory `setting` (or the environment, or the default) names; None = off."""
    value = (setting if setting is not None else os.environ.get(ENV, "")).strip()
    if value.lower() in OFF:
        return None
    if value.lower() not in DEFAULT:
        return Path(value).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spanjax" / f"jax-{jax.__version__}"


def use_persistent_cache(setting: str | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `cache_dir(setting)` (process-wide)."""
    path = cache_dir(setting)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every engine step bucket is worth keeping: a CPU compile of one takes seconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def compile_seconds() -> dict[str, float]:
    """Seconds this process has spent tracing/lowering (`trace_s`) and in backend compilation
    or persistent-cache reads (`compile_s`) for every jitted function so far."""
    return dict(_seconds)


def _record(event: str, duration: float, **_) -> None:
    if event == BACKEND_EVENT:
        _seconds["compile_s"] += duration
    elif event in TRACE_EVENTS:
        _seconds["trace_s"] += duration


jax.monitoring.register_event_duration_secs_listener(_record)
