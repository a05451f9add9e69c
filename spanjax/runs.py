"""Run directories: `runs/<name>-<timestamp>/` with the resolved config, a log,
an append-only JSONL of per-item results (the resume journal), results JSON
and plots.

A run resumes from its directory: the stored config must equal the requested
one (otherwise the numbers would mix two experiments) except for the fields a
task declares as scope (`RESUMABLE_SCOPE`, e.g. how many questions: items are
keyed and seeded per question, so growing or shrinking the count changes which
items are asked for, never their values); the stored config is then updated.
Finished items are read back from `items.jsonl` and skipped. Each item is flushed and fsynced as soon
as it is done, so an interrupt loses at most the batch in flight; a torn last
line (killed mid-write) is ignored and recomputed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from spanjax import config as C

CONFIG_FILE = "config.yaml"
ITEMS_FILE = "items.jsonl"
RESULTS_FILE = "results.json"
LOG_FILE = "log.txt"


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: Path
    log: logging.Logger
    resumed: bool

    @property
    def items_path(self) -> Path:
        return self.path / ITEMS_FILE


# Instruction sets that change what is fast on a CPU here (bf16 GEMMs need AVX512-BF16 or AMX).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model() -> str:
    """The CPU's model name, family and model, and the CPU_FEATURES it lists, e.g. "AMD EPYC
    (family 25 model 17) [avx2 ...]". The machines one benchmark runs on across sittings differ
    (an AVX512-BF16 Xeon, an AVX2-only EPYC, Zen 4 and Zen 5 EPYCs that both print "AMD EPYC"
    and differ 2x in AVX512 throughput), and which path is faster depends on it;
    platform.processor() is empty on Linux."""
    name, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    name = value.strip()
                elif key in ("cpu family", "model"):
                    ids.setdefault(key, value.strip())
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    family = f" (family {ids['cpu family']} model {ids['model']})" if len(ids) == 2 else ""
    return f"{name}{family} [{' '.join(x for x in CPU_FEATURES if x in flags)}]"


def machine_record() -> dict:
    """What benchmark results record of the machine: platform, CPU (`cpu_model`), cpus, JAX."""
    import jax

    return dict(platform=platform.platform(), processor=cpu_model(), cpus=os.cpu_count(), jax=jax.__version__)


def machine() -> str:
    """A one-line description of where the numbers came from."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.system()} {cpu_model()}, {os.cpu_count()} cpus visible, load avg {load:.1f}"


def _logger(path: Path) -> logging.Logger:
    log = logging.getLogger(f"spanjax.run.{path.resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        fh = logging.FileHandler(path / LOG_FILE)
        fh.setFormatter(fmt)
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        log.addHandler(fh)
        log.addHandler(sh)
    return log


def open_run(
    cfg,
    resume: str | Path | None = None,
    scope: tuple[str, ...] = (),
    settable: tuple[str, ...] = (),
    unused_by: Callable[[list[dict]], tuple[str, ...]] | None = None,
) -> RunDir:
    """A fresh `out_dir/<name>-<timestamp>/`, or `resume` (which must hold the same
    config, up to the dotted keys in `scope`, keys in `settable` that were unset (None)
    there: an adapter directory the finished items never used, and the keys `unused_by(items)`
    names: settings no finished item was computed with)."""
    if resume is not None:
        path = Path(resume)
        stored = path / CONFIG_FILE
        if not stored.exists():
            raise C.ConfigError(f"cannot resume {str(path)!r}: no {CONFIG_FILE} there")
        try:  # loaded, so keys a config class gained since the run started compare as their defaults
            old = C.from_dict(type(cfg), C.read_yaml(stored))
        except C.ConfigError as e:
            raise C.ConfigError(f"cannot resume {str(path)!r}: its {CONFIG_FILE}: {e}") from None

        free = unused_by(list(read_items(path / ITEMS_FILE).values())) if unused_by else ()

        def allowed(change: str) -> bool:
            key, values = change.split(": ", 1)
            return key in scope or key in free or (key in settable and values.startswith("None ->"))

        changed = [c for c in C.diff(old, cfg) if not allowed(c)]
        if changed:
            raise C.ConfigError(
                f"cannot resume {str(path)!r}: its config differs ({'; '.join(changed)}); start a new run instead"
            )
        resumed = True
        stored.write_text(C.dump(cfg))  # scope changes (if any) are now the run's config
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.out_dir) / f"{cfg.name}-{stamp}"
        n = 1
        while path.exists():  # two runs in one second
            path = Path(cfg.out_dir) / f"{cfg.name}-{stamp}-{n}"
            n += 1
        path.mkdir(parents=True)
        (path / CONFIG_FILE).write_text(C.dump(cfg))
        resumed = False
    run = RunDir(path, _logger(path), resumed)
    run.log.info("%s run %s", "resuming" if resumed else "starting", path)
    return run


def open_dir(path: str | Path) -> RunDir:
    """A run directory at `path` that is not a run (`spanjax merge`'s output): created if
    missing, refused if it already holds a config or items."""
    path = Path(path)
    taken = [name for name in (CONFIG_FILE, ITEMS_FILE) if (path / name).exists()]
    if taken:
        raise C.ConfigError(f"{str(path)!r} already holds {' and '.join(taken)}; choose a new directory")
    path.mkdir(parents=True, exist_ok=True)
    return RunDir(path, _logger(path), False)


def item_key(record: dict) -> tuple:
    return tuple(record["key"])


def load_items(run: RunDir) -> dict[tuple, dict]:
    """Finished items by key; a torn last line from a kill is dropped (and redone)."""
    return read_items(run.items_path)


def read_items(items_path: Path) -> dict[tuple, dict]:
    """The finished items of an items file by key (see `load_items`); none if it is missing."""
    done: dict[tuple, dict] = {}
    if not items_path.exists():
        return done
    with open(items_path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[item_key(rec)] = rec
    return done


def append_items(run: RunDir, records: list[dict]) -> None:
    """Append finished items durably (flush + fsync) so an interrupt keeps them."""
    if not records:
        return
    with open(run.items_path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_items(run: RunDir, records: list[dict]) -> Path:
    """Replace `items.jsonl` with `records`: compact JSON, one item per line, sorted by key
    (a merged run's journal; diffs of two such files are item by item)."""
    out = run.items_path
    tmp = out.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in sorted(records, key=item_key):
            f.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out)
    return out


def write_results(run: RunDir, results: dict) -> Path:
    out = run.path / RESULTS_FILE
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    tmp.replace(out)  # atomic: a reader never sees half a file
    return out


def progress(total: int, initial: int, desc: str):
    """A tqdm bar (stderr), disabled when SPANJAX_NO_PROGRESS is set (tests)."""
    return tqdm(
        total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=bool(os.environ.get("SPANJAX_NO_PROGRESS"))
    )
