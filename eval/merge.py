"""`spanjax merge RUN_DIR... --out DIR`: join locality run directories (shards of one
evaluation, `eval.shard=i/k`, or runs of other variants or questions) into one, as if
one run had produced every item (docs/evaluation.md#shards-and-merge).

The configs must agree on everything that changes an item's result; they may differ in
the fields that only select which items run (`SELECTION_FIELDS`). Items are keyed
(variant, question, position) and deduplicated: two copies of an item must agree on every
field but the run-state ones (timing, batch, cached tokens: `RUN_STATE_FIELDS`), else the
merge stops naming the item. DIR gets `items.jsonl` (compact, sorted by key),
`config.yaml` (the merged config: every variant, question range and position of the
inputs, no shard), and the results, summary and plot a run writes, by the same code
(`locality.write_outputs`). A merged directory resumes like a run: `spanjax run
DIR/config.yaml --resume DIR` computes the items no input had.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from spanjax import config as C
from spanjax.eval import locality as L
from spanjax.runs import CONFIG_FILE, RESULTS_FILE, RunDir, load_items, open_dir, write_items

# Config fields (dotted) that only select which items run, or name and place the run, so
# runs that differ in them hold items of one experiment; every other field (model, seed,
# dataset, split, num_docs, max_tokens, max_doc_tokens, batch_questions, every engine
# setting that can change numbers or batching: page_size, mesh, ...) must be equal.
SELECTION_FIELDS = (
    "name",
    "out_dir",
    "engine.compilation_cache",  # where compiled code is kept, not what it computes
    "eval.shard",
    "eval.num_questions",
    "eval.first_question",
    "eval.positions",
    "eval.variants",
    # adapter directories: a run without the adapter's variants may leave it unset; the runs
    # that set one must set the same directory
    "eval.lora_adapter",
    "eval.alora_adapter",
)
ADAPTER_FIELDS = ("lora_adapter", "alora_adapter")


class MergeError(ValueError):
    """The run directories cannot be merged (the message says why)."""


def _ordered_union(lists) -> tuple:
    out = []
    for xs in lists:
        out += [x for x in xs if x not in out]
    return tuple(out)


def merged_config(cfgs: list[L.LocalityConfig], paths: list[Path]) -> L.LocalityConfig:
    """The config covering every input's items (they must agree outside SELECTION_FIELDS)."""
    base = cfgs[0]
    for cfg, path in zip(cfgs[1:], paths[1:]):
        changed = [c for c in C.diff(base, cfg) if c.split(":")[0] not in SELECTION_FIELDS]
        if changed:
            raise MergeError(
                f"cannot merge {str(path)!r} with {str(paths[0])!r}: their configs differ in "
                f"{'; '.join(changed)} (only {', '.join(SELECTION_FIELDS)} may differ)"
            )
    evs = [c.eval for c in cfgs]
    adapters = {}
    for name in ADAPTER_FIELDS:
        dirs = sorted({getattr(ev, name) for ev in evs} - {None})
        if len(dirs) > 1:
            raise MergeError(f"cannot merge: the runs set different eval.{name}: {dirs}")
        adapters[name] = dirs[0] if dirs else None
    first = min(ev.first_question for ev in evs)
    end = max(ev.first_question + ev.num_questions for ev in evs)
    positions = None if any(ev.positions is None for ev in evs) else _ordered_union(ev.positions for ev in evs)
    data = C.to_dict(base)
    data["eval"].update(
        shard=None,
        first_question=first,
        num_questions=end - first,
        positions=None if positions is None else list(positions),
        variants=list(_ordered_union(ev.variants for ev in evs)),
        **adapters,
    )
    return C.from_dict(L.LocalityConfig, data)


def _comparable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in L.RUN_STATE_FIELDS}


def merge(run_dirs, out) -> tuple[dict, RunDir]:
    """Merge locality run directories into a new directory `out`; returns (results, its RunDir)."""
    from spanjax.eval.experiments import load_config

    paths = [Path(d) for d in run_dirs]
    if not paths:
        raise MergeError("nothing to merge: give one or more run directories")
    cfgs, sources = [], []
    for path in paths:
        if not (path / CONFIG_FILE).exists():
            raise MergeError(f"{str(path)!r} is not a run directory (no {CONFIG_FILE})")
        try:
            cfg = load_config(path / CONFIG_FILE)
        except C.ConfigError as e:
            raise MergeError(f"{str(path)!r}: its {CONFIG_FILE}: {e}") from None
        if cfg.task != "locality":
            raise MergeError(f"{str(path)!r} is a {cfg.task!r} run; merge joins locality runs")
        cfgs.append(cfg)
        items = load_items(RunDir(path, logging.getLogger(__name__), True))
        results = path / RESULTS_FILE
        sources.append((path, cfg, items, json.loads(results.read_text()) if results.exists() else {}))
    cfg = merged_config(cfgs, paths)

    done: dict[tuple, dict] = {}
    origin: dict[tuple, Path] = {}
    for path, _, items, _ in sources:
        for key, rec in items.items():
            if key not in done:
                done[key], origin[key] = rec, path
                continue
            a, b = _comparable(done[key]), _comparable(rec)
            if a != b:
                fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise MergeError(
                    f"item {list(key)} differs between {str(origin[key])!r} and {str(path)!r} "
                    f"(in {', '.join(fields)}): not the same experiment"
                )

    run_dir = open_dir(out)
    (run_dir.path / CONFIG_FILE).write_text(C.dump(cfg))
    write_items(run_dir, list(done.values()))
    wanted = L.scope(cfg)
    have = sum(1 for k in done if k in wanted)
    run_dir.log.info(
        "merged %d items from %d run dirs: %d/%d of the merged config's items", len(done), len(paths), have, len(wanted)
    )
    if have < len(wanted):
        run_dir.log.info("the rest: spanjax run %s --resume %s", run_dir.path / CONFIG_FILE, run_dir.path)
    names = {res.get("model") for _, _, _, res in sources} - {None}
    merged_from = [
        {"run_dir": str(path), "shard": c.eval.shard, "items": len(items), "machine": res.get("machine")}
        for path, c, items, res in sources
    ]
    results = L.write_outputs(
        cfg,
        run_dir,
        done,
        model_name=names.pop() if len(names) == 1 else cfg.model,
        extra={"merged_from": merged_from, "items_in_scope": have, "items_expected": len(wanted)},
    )
    return results, run_dir
