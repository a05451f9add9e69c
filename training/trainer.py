"""LoRA / aLoRA training (`spanjax train alora|lora|block-adapter`): adapter recipes on the
training core (training/core.py: state, jitted update, checkpoints, exact resume, metrics).

The base model is frozen; only the adapter pytree trains. For an aLoRA the prefix
(everything before the invocation) is run once through the base model into a
dense KV cache, outside the differentiated function: it does not depend on
the adapter, so only the short suffix (invocation + answer) is
back-propagated, the training-side counterpart of reusing the base cache at
inference. A LoRA adapts every token, so its whole prompt is the suffix.

Data sources (`data.source`, `SOURCES`): "answerability" (training/answerability.py,
built into the run dir), "nq_blocks" (block-attention data, training/block_adapter.py),
else a conversation JSONL path. Exact resume: data order (training/data.py) and the
dropout key (fold_in(seed, step)) are functions of the step (tests/training checks
the loss curve).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax

from spanjax.adapters import Adapter, AdapterConfig, bank_from_weights, export_peft, init_adapter
from spanjax.distributed import is_main_process
from spanjax.models import llama
from spanjax.models.config import ModelConfig
from spanjax.models.loading import load_model
from spanjax.models.sharding import param_partition_specs
from spanjax.training import block_adapter
from spanjax.training.answerability import build_records, evaluate_answerability, train_indices
from spanjax.training.config import TrainConfig
from spanjax.training.core import Objective, Recipe, crash_after, masked_nll, open_run_dir, train_loop
from spanjax.training.data import Batch, batch_indices, encode_example, make_batch, read_jsonl
from spanjax.training.mesh import to_host


def batch_loss(weights, params, model_cfg, adapter_cfg: AdapterConfig, batch: Batch, cache, rng):
    """Mean next-token NLL over the loss-masked suffix tokens, and the token count."""
    bank = bank_from_weights(weights, adapter_cfg.scale, adapter_cfg.dropout, rng)
    h, _ = llama.forward_dense(params, model_cfg, batch.suffix, batch.suffix_pos, cache, bank, None)
    return masked_nll(params, model_cfg, h, batch.labels, batch.loss_mask)


@dataclasses.dataclass(frozen=True)
class ConversationObjective:
    """Adapter NLL of the suffix tokens after the invocation; an aLoRA's prefix is base-model KV."""

    model_cfg: ModelConfig
    adapter_cfg: AdapterConfig

    def context(self, params, batch: Batch):
        B, P = batch.prefix.shape
        cache = llama.init_dense_cache(self.model_cfg, B, P + batch.suffix.shape[1])
        if P:  # base-model prefix (aLoRA): no gradient flows here
            _, cache = llama.forward_dense(params, self.model_cfg, batch.prefix, batch.prefix_pos, cache)
            cache = jax.lax.stop_gradient(cache)
        return cache

    def loss(self, weights, rng, params, batch: Batch, cache):
        loss, n = batch_loss(weights, params, self.model_cfg, self.adapter_cfg, batch, cache, rng)
        return loss, {"loss_tokens": n}


# ---------------------------------------------------------------------------- data sources


def answerability_records(cfg: TrainConfig, run_dir: Path) -> list[dict]:
    """The answerability intrinsic's conversations, written once to run_dir/train.jsonl (a resumed run reads it)."""
    path = run_dir / "train.jsonl"
    if not path.exists():
        recs = build_records(
            train_indices(cfg.data.num_train_questions), cfg.data.num_docs, cfg.data.max_doc_words, cfg.seed
        )
        tmp = path.with_suffix(f".tmp{jax.process_index()}")  # each process of a multi-host run its own
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
        os.replace(tmp, path)
    return read_jsonl(path)


def jsonl_records(cfg: TrainConfig, run_dir: Path) -> list[dict]:
    return read_jsonl(cfg.data.source)


def conversation_source(
    cfg: TrainConfig, model, run_dir: Path, records: Callable[[TrainConfig, Path], list[dict]] = jsonl_records
) -> tuple[AdapterConfig, Objective, Callable[[int], Batch]]:
    """Conversation records (JSONL rows of {"messages": [...]}): (adapter config, objective, batch of a step)."""
    tok = model.tokenizer
    inv_ids = list(tok.encode_message(cfg.data.invocation_role, cfg.data.invocation))
    acfg = cfg.adapter.build(inv_ids)
    examples = [
        encode_example(tok, r, inv_ids, cfg.data.max_prefix_tokens, cfg.data.max_suffix_tokens)
        for r in records(cfg, run_dir)
    ]
    lora = acfg.kind == "lora"
    P, S = cfg.data.max_prefix_tokens, cfg.data.max_suffix_tokens + (cfg.data.max_prefix_tokens if lora else 0)

    def batch(step: int) -> Batch:
        idx = batch_indices(len(examples), cfg.batch_size, step, cfg.seed)
        return make_batch([examples[i] for i in idx], P, S, all_adapted=lora)

    return acfg, ConversationObjective(model.cfg, acfg), batch


# data.source -> (cfg, model, run_dir) -> (adapter config, objective, batch of a step);
# any other source names a conversation JSONL file.
SOURCES: dict[str, Callable] = {
    "answerability": functools.partial(conversation_source, records=answerability_records),
    block_adapter.SOURCE: block_adapter.source,
}


# ---------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, model=None, crash_after_step: int | None = None) -> dict:
    """Train (or resume) the run in `cfg.out_dir/cfg.name`; returns a summary dict.

    Outputs: config.yaml, train.jsonl (built data), metrics.jsonl (one line per
    step), checkpoints/ (Orbax, every `checkpoint_every` steps and at the end),
    adapter/ (PEFT format), eval.json when `eval.num_questions` > 0.
    """
    run_dir = open_run_dir(cfg)
    model = load_model(cfg.model) if model is None else model
    acfg, objective, batch = SOURCES.get(cfg.data.source, conversation_source)(cfg, model, run_dir)
    weights = init_adapter(acfg, model.cfg, jax.random.PRNGKey(cfg.seed)).weights
    recipe = Recipe(
        f"{acfg.kind} {cfg.name}",
        weights,
        objective,
        model.params,
        batch,
        # On a mesh: the base model by the "training" rules (FSDP over data, heads and MLP over
        # model); the adapter weights (small) replicated.
        frozen_specs=lambda mesh: param_partition_specs(model.cfg, model.params, "training", mesh),
    )
    hooks = [] if crash_after_step is None else [crash_after(crash_after_step)]
    out = train_loop(cfg, run_dir, recipe, hooks)
    adapter = Adapter(acfg, to_host(out.state.params))
    if is_main_process():
        export_peft(adapter, str(run_dir / "adapter"), base_model_name_or_path=cfg.model)
    summary = {"run_dir": str(run_dir), "steps": cfg.steps, "resumed_from": out.resumed_from, "train_s": out.wall_s}
    if cfg.eval.num_questions:
        ev = evaluate_answerability(
            model, adapter, cfg, num_questions=cfg.eval.num_questions, batch_size=cfg.eval.batch_size
        )
        if is_main_process():
            (run_dir / "eval.json").write_text(json.dumps(ev, indent=2))
        summary["eval"] = ev
    return summary
