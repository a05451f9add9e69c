"""Attention locality: multi-document QA accuracy against the gold document's
position, stock prompts vs span queries (docs/evaluation.md).

Tasks (`eval.dataset`: `nq`, `kv`), their examples and metrics: spanjax/tasks/locality.py,
shared with block-adapter training.

Variants: `stock` (one causal prompt), `span-sequential` / `span-parallel`
(documents in a plus, prefix attention) and `-isolated` versions of both;
with a block-attention adapter (training/block_adapter.py; directories in
`eval.lora_adapter` / `eval.alora_adapter`): `stock+lora`,
`span-sequential+lora`, `span-parallel+lora`, `span-sequential+alora`,
`span-parallel+alora`. The aLoRA is invoked at the question, so its documents'
pages are the base model's and hit what the base variants cached.
The `-ranked` variants first score every document alone with the relevance intrinsic
(`eval.relevance_adapter`, one engine batch of one-token queries), then list them least
relevant first and keep the `eval.ranked_keep` most relevant (`relevance_scores`).
The distractors keep one order and the gold document moves, so a span
variant's document pages are reused across gold positions; only the gold
document (its label changes), the distractors whose label shifts by one, and
the question are recomputed. Work is submitted as one batch per gold position
over a chunk of questions, so continuous batching fills the steps and the
pages of position p are cached before position p+1 asks for them.

With `engine.mesh` data=D > 1 the batches run on D engine replicas (`EngineReplicas`), every
batch of a chunk of questions on one replica (its cache reuse intact); items are appended
as each batch finishes and aggregated by key, so the table is one engine's.

`eval.shard` "i/k" runs every k-th chunk of questions; `spanjax merge` (eval/merge.py)
joins shard (or any compatible) run directories, aggregated by `write_outputs` like a
run. Wilson intervals and McNemar's paired test against stock: eval/stats.py.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from spanjax.adapters import load_peft
from spanjax.config import ConfigError
from spanjax.engine.adapters import AdapterError, lower_for_engine
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.replicas import EngineReplicas
from spanjax.engine.sampling import SamplingParams
from spanjax.eval.experiment_config import EXPERIMENT_ENGINE
from spanjax.eval.stats import paired_test, wilson
from spanjax.models.loading import load_model
from spanjax.runs import RunDir, append_items, item_key, load_items, machine, progress, write_results
from spanjax.tasks.answerability import label_token_ids
from spanjax.tasks.locality import (
    BASE_VARIANTS,
    EXAMPLES,
    RELEVANCE_INVOCATION,
    REWEIGHT_BIAS,
    REWEIGHT_SCALE,
    VARIANT_ADAPTER,
    VARIANTS,
    Example,
    _split_range,
    make_g,
    order_invariant,
    ranked_order,
    relevance_g,
    uses_ranking,
    uses_reweight,
)

# Items are keyed (variant, question, position) and seeded per question, so a
# run resumed with more (or fewer) questions or variants, or another shard, keeps
# every finished item valid; the results cover the items of the last config.
RESUMABLE_SCOPE = ("eval.num_questions", "eval.variants", "eval.shard")
# An adapter directory a run did not have may be added when resuming it (for its adapter variants,
# which then start); one it had may not change (its items were computed with it).
RESUMABLE_WHEN_UNSET = ("eval.lora_adapter", "eval.alora_adapter", "eval.relevance_adapter")
# Settings only some variants read: they may change on resume while no
# finished item belongs to such a variant (e.g. the re-weighting chosen on DEV after a held-out
# run started without it).
RESUMABLE_WHILE_UNUSED = {
    "eval.reweight_scale": uses_reweight,
    "eval.reweight_bias": uses_reweight,
    "eval.ranked_keep": uses_ranking,
}


def keys_unused_by(items: list[dict]) -> tuple[str, ...]:
    """The `RESUMABLE_WHILE_UNUSED` keys no finished item was computed with."""
    variants = {rec["variant"] for rec in items}
    return tuple(k for k, uses in RESUMABLE_WHILE_UNUSED.items() if not any(uses(v) for v in variants))


# Item fields that depend on when and beside what an item ran (timing, batch, what the
# cache held), not on the item itself: left out when two copies of an item are compared.
RUN_STATE_FIELDS = ("ttft_s", "batch_s", "batch_size", "cached_tokens")

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """(i, k) of a shard "i/k" (0 <= i < k); None for None."""
    if shard is None:
        return None
    m = _SHARD.fullmatch(shard)
    i, k = (int(m[1]), int(m[2])) if m else (-1, 0)
    if not 0 <= i < k:
        raise ValueError(f"shard must be 'i/k' with 0 <= i < k (e.g. 0/2), got {shard!r}")
    return i, k


@dataclasses.dataclass(frozen=True)
class LocalityEval:
    dataset: Literal["nq", "kv"] = "nq"
    split: Literal["dev", "held_out"] = "held_out"  # reported numbers: held_out only
    num_docs: int = 10  # K
    num_questions: int = 200  # per gold position
    first_question: int = 0  # offset into the split
    positions: tuple[int, ...] | None = None  # gold positions; null = every 0..K-1
    variants: tuple[str, ...] = BASE_VARIANTS
    max_tokens: int = 24  # greedy decoding
    max_doc_tokens: int = 0  # cut each document to this many tokens (0 = whole)
    batch_questions: int = 16  # questions per engine batch (one gold position each)
    # PEFT adapter directories for the +lora / +alora variants
    # (`spanjax train block-adapter` writes runs/<name>/adapter)
    lora_adapter: str | None = None
    alora_adapter: str | None = None
    # (scale, bias) of the -reweight variants' logits on the documents (choose them on split dev)
    reweight_scale: float = REWEIGHT_SCALE
    reweight_bias: float = REWEIGHT_BIAS
    # The relevance intrinsic the -ranked variants score documents with (`spanjax train lora
    # configs/lora_relevance.yaml` writes runs/lora_relevance/adapter), and how many of the most
    # relevant documents they keep (0 = all; choose it on split dev)
    relevance_adapter: str | None = None
    ranked_keep: int = 0
    # "i/k": run only the question chunks (of batch_questions) whose index % k == i, so k
    # processes split one evaluation by question (every variant and position of a question in
    # one shard: pairs stay whole); `spanjax merge` joins their run dirs. null = everything.
    shard: str | None = None
    # Variants whose query is the same for every gold position (`order_invariant`: a parallel
    # plus) run once per question, at the first gold position, and the item is recorded for
    # every position (its copies carry `computed_at`); false runs every position.
    order_invariant_once: bool = True

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"variants: unknown {bad}, expected some of {list(VARIANTS)}")
        if self.num_docs < 1 or self.num_questions < 1 or self.max_tokens < 1 or self.batch_questions < 1:
            raise ValueError("num_docs, num_questions, max_tokens and batch_questions must be >= 1")
        if self.positions is not None and any(not 0 <= p < self.num_docs for p in self.positions):
            raise ValueError(
                f"positions must lie in 0..{self.num_docs - 1} (num_docs={self.num_docs}), got {list(self.positions)}"
            )
        missing = sorted(
            {a for v in self.variants for a in [VARIANT_ADAPTER.get(v)] if a and not getattr(self, f"{a}_adapter")}
        )
        if missing:
            raise ValueError(
                f"variants with an adapter need its directory: set {', '.join(f'eval.{a}_adapter' for a in missing)}"
            )
        ranked = [v for v in self.variants if uses_ranking(v)]
        if ranked and not self.relevance_adapter:
            raise ValueError(
                f"{', '.join(ranked)} rank documents with the relevance intrinsic: set eval.relevance_adapter"
            )
        if ranked and self.dataset != "nq":
            raise ValueError(
                f"{', '.join(ranked)}: the relevance intrinsic is trained on nq; dataset is {self.dataset}"
            )
        if not 0 <= self.ranked_keep <= self.num_docs:
            raise ValueError(f"ranked_keep must lie in 0..num_docs={self.num_docs} (0 = all), got {self.ranked_keep}")
        if self.dataset == "kv" and self.num_docs > 75:
            raise ValueError("kv: num_docs must be <= 75 (there are 75 records to split)")
        parse_shard(self.shard)  # a malformed shard fails here, naming itself

    @property
    def shard_spec(self) -> tuple[int, int] | None:
        """(i, k) of `shard` "i/k", None for the whole evaluation."""
        return parse_shard(self.shard)

    @property
    def gold_positions(self) -> tuple[int, ...]:
        return tuple(range(self.num_docs)) if self.positions is None else self.positions


@dataclasses.dataclass(frozen=True)
class LocalityConfig:
    task: Literal["locality"] = "locality"
    name: str = "locality_nq"
    model: str = "smollm2-135m"
    seed: int = 0
    out_dir: str = "runs"
    engine: EngineConfig = EXPERIMENT_ENGINE
    eval: LocalityEval = LocalityEval()


# ---------------------------------------------------------------------------- examples


def locality_examples(ev: LocalityEval, seed: int, tokenizer=None) -> list[Example]:
    """The eval's examples: its dataset's builder (spanjax.tasks.locality) over its split and sizes."""
    return EXAMPLES[ev.dataset](
        split=ev.split,
        num_docs=ev.num_docs,
        num_questions=ev.num_questions,
        first_question=ev.first_question,
        max_doc_tokens=ev.max_doc_tokens,
        seed=seed,
        tokenizer=tokenizer,
    )


def register_adapters(engine, ev: LocalityEval) -> None:
    """Load the PEFT adapters the variants name and register them as "lora" / "alora", and the
    relevance intrinsic as "relevance" when a ranked variant runs."""
    for name in sorted({VARIANT_ADAPTER[v] for v in ev.variants if v in VARIANT_ADAPTER}):
        adapter = load_peft(getattr(ev, f"{name}_adapter"), engine.model.cfg)
        if adapter.config.kind != name:
            raise ValueError(f"eval.{name}_adapter is a {adapter.config.kind} adapter, expected {name}")
        engine.register_adapter(name, adapter)
    if any(uses_ranking(v) for v in ev.variants):
        engine.register_adapter("relevance", load_relevance_adapter(ev.relevance_adapter, engine.model.cfg))


def load_relevance_adapter(directory: str, model_cfg):
    """The relevance intrinsic: a LoRA trained with the invocation the ranked variants send
    (checked against the training config saved beside it, when there is one)."""
    adapter = load_peft(directory, model_cfg)
    if adapter.config.kind != "lora":
        raise ValueError(f"eval.relevance_adapter is a {adapter.config.kind} adapter, expected a lora")
    for path in (Path(directory) / "train_config.yaml", Path(directory).parent / "config.yaml"):
        if path.is_file():
            invocation = (yaml.safe_load(path.read_text()) or {}).get("data", {}).get("invocation")
            if invocation != RELEVANCE_INVOCATION:
                raise ValueError(
                    f"{path}: trained with invocation {invocation!r}, the ranking sends {RELEVANCE_INVOCATION!r}"
                )
            break
    return adapter


def relevance_scores(engine: Engine, queries: list[tuple[Example, int]], page_size: int) -> list[np.ndarray]:
    """For each (example, gold position): every document's score by the relevance intrinsic,
    scored alone (the logit of "answerable" minus that of "unanswerable" at its one generated
    token), in the order of `ex.bodies(position)`. One engine batch for all of them."""
    tok, name = engine.model.tokenizer, engine.model.name
    yes, no = label_token_ids(tok)
    greedy_one = SamplingParams(max_tokens=1, temperature=0.0)
    rows = []
    for ex, p in queries:
        plans = [
            lower_for_engine(relevance_g(ex, b, name), tok, model=name, page_size=page_size, adapters=engine.adapters)
            for b in ex.bodies(p)
        ]
        rows.append([engine.submit(pl, greedy_one, keep_logits=True) for pl in plans])
    engine.run_until_done([r for row in rows for r in row])
    return [np.array([r.logits[0][yes] - r.logits[0][no] for r in row], np.float32) for row in rows]


# ---------------------------------------------------------------------------- run


def question_indices(ev: LocalityEval) -> list[int]:
    """The eval's questions (their lines in the data file), without reading the data."""
    return list(_split_range(ev.dataset, ev.split)[ev.first_question : ev.first_question + ev.num_questions])


def work_order(cfg: LocalityConfig, examples: list[Example] | list[int]) -> list[list[tuple[str, int, int]]]:
    """Batches of item keys (variant, question index, gold position): per chunk
    of questions, per variant, one batch per position (pages of position p are
    cached by the time p+1 runs). Chunk-major, so an interrupted run has every
    variant on the same questions. With `eval.shard` "i/k", only the chunks whose
    index % k == i. `examples`: the examples, or their question indices."""
    ev = cfg.eval
    indices = [ex if isinstance(ex, int) else ex.index for ex in examples]
    i, k = ev.shard_spec or (0, 1)
    batches = []
    for n, c in enumerate(range(0, len(indices), ev.batch_questions)):
        if n % k != i:
            continue
        chunk = indices[c : c + ev.batch_questions]
        for v in ev.variants:
            for p in computed_positions(ev, v):
                batches.append([(v, q, p) for q in chunk])
    return batches


def computed_positions(ev: LocalityEval, variant: str) -> tuple[int, ...]:
    """The gold positions `variant` is run at: the first only, when its query is the same at
    every position (`order_invariant`) and `order_invariant_once` is on."""
    once = ev.order_invariant_once and order_invariant(variant)
    return ev.gold_positions[:1] if once else ev.gold_positions


def recorded_keys(ev: LocalityEval, key: tuple[str, int, int]) -> list[tuple[str, int, int]]:
    """The item keys a run of `key` (a work_order key) is recorded under: every gold position
    when the variant runs once per question, else the key itself."""
    v, q, _ = key
    if len(computed_positions(ev, v)) == len(ev.gold_positions):
        return [key]
    return [(v, q, p) for p in ev.gold_positions]


def scope(cfg: LocalityConfig) -> set[tuple[str, int, int]]:
    """The item keys the config asks for (its variants, questions, positions and shard)."""
    ev = cfg.eval
    return {k for batch in work_order(cfg, question_indices(ev)) for key in batch for k in recorded_keys(ev, key)}


def aggregate(cfg: LocalityConfig, done: dict[tuple, dict]) -> dict:
    """Accuracy and 95% Wilson intervals per variant and gold position, and (when `stock`
    is a variant) McNemar's exact test of each other variant against stock on the items
    both have (same question and position): `vs_stock` (eval/stats.py; b = pairs only the
    variant answers correctly, c = pairs only stock does), overall and per position."""
    ev = cfg.eval
    table = {}
    for v in ev.variants:
        rows = []
        for p in ev.gold_positions:
            recs = [r for key, r in done.items() if key[0] == v and key[2] == p]
            k, n = sum(bool(r["correct"]) for r in recs), len(recs)
            lo, hi = wilson(k, n)
            rows.append({"position": p, "correct": k, "n": n, "accuracy": k / n if n else None, "ci95": [lo, hi]})
        # "all" counts what was computed: a variant run once per question has its items' copies
        # at the other positions, which are not more evidence; nor are its runs at other
        # positions from a sitting with `order_invariant_once` off (the same query again), so
        # only the positions it is computed at count: one query per question.
        positions = computed_positions(ev, v)
        recs = [r for key, r in done.items() if key[0] == v and key[2] in positions]
        recs = [r for r in recs if "computed_at" not in r]
        all_k, all_n = sum(bool(r["correct"]) for r in recs), len(recs)
        questions = len({r["question"] for r in recs})
        table[v] = {
            "per_position": rows,
            "accuracy": all_k / all_n if all_n else None,
            "ci95": list(wilson(all_k, all_n)),
            "n": all_n,
            "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] for r in recs])) if recs else None,
            "mean_cached_tokens": float(np.mean([r["cached_tokens"] for r in recs])) if recs else None,
            "mean_item_s": float(np.mean([r["batch_s"] / r["batch_size"] for r in recs])) if recs else None,
            # engine seconds per question (every gold position it ran at), from the batches' wall times
            "s_per_question": sum(r["batch_s"] / r["batch_size"] for r in recs) / questions if recs else None,
            "vs_stock": vs_stock(cfg, done, v),
        }
        ranked = [r for r in recs if "gold_rank" in r]
        if ranked:  # how well the relevance intrinsic found the gold document
            table[v]["ranking"] = {
                "n": len(ranked),
                "gold_ranked_first": float(np.mean([r["gold_rank"] == 0 for r in ranked])),
                "gold_kept": float(np.mean([r["gold_kept"] for r in ranked])),
                "mean_gold_rank": float(np.mean([r["gold_rank"] for r in ranked])),
            }
    return table


def vs_stock(cfg: LocalityConfig, done: dict[tuple, dict], variant: str) -> dict | None:
    """McNemar's exact test of `variant` against `stock` on their paired items, overall and per
    gold position; None for stock itself or without stock."""
    if variant == "stock" or "stock" not in cfg.eval.variants:
        return None
    pairs = {}  # (question, position) -> (variant correct, stock correct)
    for (v, q, p), r in done.items():
        if v == variant and ("stock", q, p) in done:
            pairs[(q, p)] = (bool(r["correct"]), bool(done[("stock", q, p)]["correct"]))
    return {
        "overall": paired_test(pairs.values()),
        "per_position": [
            {"position": p, **paired_test(x for (_, pp), x in pairs.items() if pp == p)}
            for p in cfg.eval.gold_positions
        ],
    }


def _mark(test: dict | None) -> str:
    """`*` significantly better than stock, `†` significantly worse, else nothing."""
    if not test or not test["significant"]:
        return ""
    return "*" if test["b"] > test["c"] else "†"


def markdown_table(cfg: LocalityConfig, table: dict) -> str:
    ps = cfg.eval.gold_positions
    head = "| variant | " + " | ".join(f"pos {p}" for p in ps) + " | all [95% CI] | n/pos |"
    sep = "|---" * (len(ps) + 3) + "|"
    lines = [head, sep]
    for v, t in table.items():
        tests = t.get("vs_stock") or {}
        marks = [_mark(x) for x in tests.get("per_position", [None] * len(ps))]
        cells = [
            f"{r['accuracy']:.3f}{m}" if r["accuracy"] is not None else "-" for r, m in zip(t["per_position"], marks)
        ]
        lo, hi = t["ci95"]
        allc = (
            f"{t['accuracy']:.3f}{_mark(tests.get('overall'))} [{lo:.3f}, {hi:.3f}]"
            if t["accuracy"] is not None
            else "-"
        )
        n = min(r["n"] for r in t["per_position"])
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {allc} | {n} |")
    legend = "all: accuracy over every position [95% Wilson interval]."
    once = [v for v in table if len(computed_positions(cfg.eval, v)) < len(ps)]
    if once:
        legend += (
            " Run once per question (the same query at every gold position: a parallel plus, or documents"
            f" listed by relevance), recorded at every position, counted once in all: {', '.join(once)}."
        )
    if "stock" in table and len(table) > 1:
        legend = (
            "\\* / †: significantly better / worse than stock at 95% (McNemar's exact test on the items both "
            "answered: same question and position); " + legend
        )
    return "\n".join(lines) + "\n\n" + legend


def plot(cfg: LocalityConfig, table: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    # questions per position: in the title when every variant has the same, else in the legend
    ns = {v: max((r["n"] for r in t["per_position"]), default=0) for v, t in table.items()}
    same_n = len({n for n in ns.values() if n}) <= 1
    top = 0.0
    for i, (v, t) in enumerate(table.items()):
        rows = [r for r in t["per_position"] if r["n"]]
        if not rows:
            continue
        x = np.array([r["position"] for r in rows]) + (i - len(table) / 2) * 0.04  # dodge overlapping bars
        y = np.array([r["accuracy"] for r in rows])
        lo = np.maximum(y - np.array([r["ci95"][0] for r in rows]), 0.0)  # matplotlib refuses -1e-16
        hi = np.maximum(np.array([r["ci95"][1] for r in rows]) - y, 0.0)
        # tab20 dark shades, then light ones with another marker: the default cycle repeats after ten
        style = dict(color=plt.cm.tab20((2 * i) % 20 + (i // 10) % 2), marker="osD^v"[(i // 10) % 5])
        ax.errorbar(x, y, yerr=[lo, hi], capsize=3, label=v if same_n else f"{v} (n={ns[v]})", **style)
        top = max(top, float(np.max(y + hi)))
    ev = cfg.eval
    ax.set_xlabel("gold document position (0 = first)")
    ax.set_ylabel("accuracy (95% Wilson CI)")
    n = f"n={max(ns.values(), default=0)}/position" if same_n else "n per position in the legend"
    ax.set_title(f"{cfg.model}, {ev.dataset}, K={ev.num_docs}, {ev.split}, {n}")
    ax.set_ylim(0, min(1.0, max(0.5, top + 0.05)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves overlap
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_replicas(model, engine_cfg: EngineConfig) -> EngineReplicas:
    """The run's engines: one, or with `engine.mesh` data=D > 1, D replicas (one per (1, M) row
    of the mesh). A mesh the devices or the model do not fit is a ConfigError (one line)."""
    try:
        return EngineReplicas(model, engine_cfg)
    except ValueError as e:
        if engine_cfg.mesh is None:
            raise
        raise ConfigError(f"engine.mesh={engine_cfg.mesh_spec}: {e}") from e


def run(cfg: LocalityConfig, run_dir: RunDir, model=None) -> dict:
    """Run the config's batches (work_order) that are not done yet, appending each batch's items
    durably as it finishes, and aggregate.

    With `engine.mesh` data=D > 1 the batches run on D engine replicas (EngineReplicas), all the
    batches of a chunk of questions on one replica, so a question's documents stay cached across
    its gold positions and variants as on one engine; a replica's exception stops the others
    after their current batch (the items finished are kept), then propagates."""
    log, ev = run_dir.log, cfg.eval
    model = load_model(cfg.model) if model is None else model
    tok = model.tokenizer
    examples = locality_examples(ev, cfg.seed, tok)
    by_index = {ex.index: ex for ex in examples}
    done = load_items(run_dir)
    batches = work_order(cfg, examples)
    total = sum(len(b) for b in batches)
    finished = lambda key: all(k in done for k in recorded_keys(ev, key))  # noqa: E731
    initial = sum(1 for b in batches for k in b if finished(k))
    if initial:
        log.info("resume: %d/%d items already done, skipped", initial, total)
    # The batches left, each with its chunk (its questions): the unit a replica owns.
    pending = [([k for k in b if not finished(k)], tuple(q for _, q, _ in b)) for b in batches]
    pending = [(todo, chunk) for todo, chunk in pending if todo]
    replicas = make_replicas(model, cfg.engine)
    if len(replicas) > 1:
        log.info("%d engine replicas (%s); chunks of questions dealt round-robin", len(replicas), cfg.engine.mesh_spec)
    for engine in replicas.engines:
        register_adapters(engine, ev)

    def plan(engine: Engine, key: tuple[str, int, int], order: tuple[int, ...] | None = None):
        # An aLoRA g keys its pages before the invocation as base pages (shared with the base variants).
        v, q, p = key
        g = make_g(by_index[q], p, v, model.name, ev.max_tokens, (ev.reweight_scale, ev.reweight_bias), order)
        return lower_for_engine(g, tok, model=model.name, page_size=cfg.engine.page_size, adapters=engine.adapters)

    # Every variant's query for one question is lowered before any work, so a variant the task
    # cannot run (an aLoRA whose invocation sequence its prompt lacks) stops the run now, not
    # after hours of the variants before it in the work order.
    for v in ev.variants:
        try:
            order = tuple(range(ev.num_docs)) if uses_ranking(v) else None
            plan(replicas.engines[0], (v, examples[0].index, ev.gold_positions[0]), order)
        except AdapterError as e:
            raise ConfigError(f"eval.variants: {v} cannot run on the {ev.dataset} task's prompt: {e}") from None
    sampling = SamplingParams(max_tokens=ev.max_tokens, temperature=0.0, seed=cfg.seed)
    bar = progress(total, initial, f"{cfg.name}")
    lock = threading.Lock()  # the items file, `done` and the bar, shared by the replicas' threads

    def run_batch(engine: Engine, todo: list[tuple[str, int, int]]) -> None:
        t0 = time.perf_counter()
        orders = [None] * len(todo)
        if uses_ranking(todo[0][0]):  # a batch is one variant's
            scores = relevance_scores(engine, [(by_index[q], p) for _, q, p in todo], cfg.engine.page_size)
            orders = [ranked_order(sc, ev.ranked_keep) for sc in scores]
        plans = [plan(engine, key, order) for key, order in zip(todo, orders)]
        reqs = [engine.submit(pl, sampling) for pl in plans]
        engine.run_until_done(reqs)
        dt = time.perf_counter() - t0
        recs = []
        for i, ((v, q, p), r, order) in enumerate(zip(todo, reqs, orders)):
            s = r.summary()
            rec = {
                "key": [v, q, p],
                "variant": v,
                "question": q,
                "position": p,
                "output": r.text,
                "correct": by_index[q].correct(r.text),
                "prompt_tokens": s["prompt_tokens"],
                "cached_tokens": s["cached_tokens"],
                "ttft_s": s["ttft_s"],
                "batch_s": dt,
                "batch_size": len(todo),
            }
            if order is not None:  # where the intrinsic ranked the gold document (0 = most relevant)
                rec.update(order=list(order), gold_rank=ranked_order(scores[i])[::-1].index(p), gold_kept=p in order)
            recs.append(rec)
            copies = [k for k in recorded_keys(ev, (v, q, p)) if k[2] != p]
            recs += [{**rec, "key": list(k), "position": k[2], "computed_at": p} for k in copies]
        with lock:
            append_items(run_dir, recs)  # durable before counting it done
            for rec in recs:
                done[item_key(rec)] = rec
            bar.update(len(todo))
            bar.set_postfix_str(f"{todo[0][0]} pos {todo[0][2]}: {sum(r['correct'] for r in recs)}/{len(recs)}")

    t_run = time.perf_counter()
    try:
        replicas.map(run_batch, [todo for todo, _ in pending], groups=[chunk for _, chunk in pending])
    finally:
        bar.close()
    stats = replicas.stats()
    return write_outputs(
        cfg,
        run_dir,
        done,
        model_name=model.name,
        extra={
            "machine": machine(),
            "wall_s_this_session": time.perf_counter() - t_run,
            "engine": stats[0] if len(stats) == 1 else {"replicas": stats},
        },
    )


def write_outputs(cfg: LocalityConfig, run_dir: RunDir, done: dict[tuple, dict], model_name: str, extra: dict) -> dict:
    """Aggregate the items of `done` inside the config's scope (a resumed run, or a merge, may
    hold more) and write results.json, summary.md and accuracy.png: the end of a run, and of
    `spanjax merge` (eval/merge.py). `extra`: run-specific results fields (machine, engine, ...)."""
    ev, wanted = cfg.eval, scope(cfg)
    table = aggregate(cfg, {k: r for k, r in done.items() if k in wanted})
    md = markdown_table(cfg, table)
    adapters = sorted({VARIANT_ADAPTER[v] for v in ev.variants if v in VARIANT_ADAPTER})
    results = {
        "task": "locality",
        "name": cfg.name,
        "model": model_name,
        "dataset": ev.dataset,
        "split": ev.split,
        "num_docs": ev.num_docs,
        "shard": ev.shard,
        **extra,
        "adapters": {name: getattr(ev, f"{name}_adapter") for name in adapters},
        "accuracy": table,
        "table_markdown": md,
    }
    write_results(run_dir, results)
    (run_dir.path / "summary.md").write_text(md + "\n")
    plot(cfg, table, run_dir.path / "accuracy.png")
    run_dir.log.info("accuracy by gold position:\n%s", md)
    return results
