"""MLP speculator training (docs/design.md §8): a functional, jitted `train_step(state, batch)`.

The base model is frozen, so its final hidden states are computed once per
example and cached in the run directory (`cache/stage{1,2}.npz`); training
steps then only run the speculator. Two stages share one step counter, one
optimizer (AdamW, warmup + cosine, clipping) and one schedule:

1. teacher forcing on text (`data.stage1_source`, by default the gold
   passages of nq-open-oracle DEV questions): hidden[j] is the base state
   that read text token j, tokens[j] the text token that follows;
2. the base model's own continuations (`data.stage2_source` prompts, by
   default chat prompts of DEV questions, generated once with
   `data.temperature`, optionally once more sampled for the first
   `data.sampled_prompts`, and stored in `stage2.jsonl`): hidden[j] is the state
   that chose generated token j.

Head i at position j reads tokens[j + i] (head 0 also hidden[j]) and predicts
tokens[j + i + 1]; the loss is the sum over heads of each head's mean
cross-entropy. With `data.val_prompts`, the continuations of the last stage-2
prompts are held out of training and every `eval_every` steps the run logs
each head's top-1 on them and the tokens per verification forward that greedy
speculative decoding would emit there, with the greedy draft and with draft
trees (`validate`).

The run is a recipe of the training core (training/core.py: state, jitted
update, checkpoints, metrics, progress). Exact resume: batches are a function of
the step, the Orbax checkpoint holds the whole state and the cached data is
reread, so a killed run replays the same loss curve. The result is
exported in the Hugging Face MLPSpeculator format (`speculator/`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from spanjax.distributed import is_main_process
from spanjax.engine.dense_generate import generate
from spanjax.engine.sampling import SamplingParams
from spanjax.models import llama
from spanjax.models import speculator as S
from spanjax.models.loading import load_model
from spanjax.runs import progress
from spanjax.tasks.data import nq_open_oracle, passage_text
from spanjax.training.core import Recipe, TrainState, crash_after, open_run_dir, train_loop
from spanjax.training.data import batch_indices, prompt_ids
from spanjax.training.mesh import to_host
from spanjax.training.speculator_config import SpeculatorTrainConfig


def speculator_config(cfg: SpeculatorTrainConfig, model_cfg, vocab_size: int | None = None) -> S.SpeculatorConfig:
    s = cfg.speculator
    return S.SpeculatorConfig(
        emb_dim=model_cfg.hidden_size,
        vocab_size=vocab_size or model_cfg.vocab_size,
        inner_dim=s.inner_dim,
        n_predict=s.n_predict,
        tie_weights=s.tie_weights,
        scale_input=s.scale_input,
    )


def train_vocab_lut(datas: list[dict], limit: int, V: int) -> np.ndarray:
    """Full id -> training id: the limit - 1 most frequent target tokens (ties by id) keep their
    own row/column, every other token shares the last one. Identity when limit is 0 or >= V."""
    if not limit or limit >= V:
        return np.arange(V, dtype=np.int32)
    counts = np.zeros(V, np.int64)
    for d in datas:
        np.add.at(counts, d["tokens"][d["mask"] > 0], 1)
    order = np.lexsort((np.arange(V), -counts))[: limit - 1]
    keep = np.sort(order[counts[order] > 0])
    lut = np.full(V, len(keep), np.int32)
    lut[keep] = np.arange(len(keep), dtype=np.int32)
    return lut


def expand_vocab(params: S.SpeculatorParams, lut: np.ndarray) -> S.SpeculatorParams:
    """Training-vocabulary weights -> full-vocabulary weights (rare tokens share the last row/column)."""
    return S.SpeculatorParams(
        emb=np.asarray(params.emb)[:, lut],
        proj0=np.asarray(params.proj0),
        proj=np.asarray(params.proj),
        ln_weight=np.asarray(params.ln_weight),
        ln_bias=np.asarray(params.ln_bias),
        head=np.asarray(params.head)[:, :, lut],
    )


# ---------------------------------------------------------------------------- loss and step


def _heads_and_targets(params, spec_cfg: S.SpeculatorConfig, hidden, tokens, mask):
    """Per head i: (teacher-forced logits [B, L, V], targets tokens[j + i + 1] [B, L], their mask)."""
    L = hidden.shape[1]
    for i, logits in enumerate(S.teacher_forced_logits(params, spec_cfg, hidden, tokens)):
        yield logits, tokens[:, i + 1 : i + 1 + L], mask[:, i + 1 : i + 1 + L]


def speculator_loss(params, spec_cfg: S.SpeculatorConfig, hidden, tokens, mask):
    """hidden [B, L, H], tokens / mask [B, L + n_predict] ->
    (sum of per-head mean NLL, (per-head NLL, top-1 accuracy))."""
    losses, accs = [], []
    for logits, tgt, m in _heads_and_targets(params, spec_cfg, hidden, tokens, mask):
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
        n = jnp.maximum(jnp.sum(m), 1.0)
        losses.append(jnp.sum(nll * m) / n)
        accs.append(jnp.sum((jnp.argmax(logits, axis=-1) == tgt) * m) / n)
    return sum(losses), (jnp.stack(losses), jnp.stack(accs))


@functools.partial(jax.jit, static_argnames=("spec_cfg",))
def _target_ranks(params, spec_cfg: S.SpeculatorConfig, hidden, tokens, mask, rare):
    """[B, L, n_predict] int: the rank of tokens[j + i + 1] among head i's logits at j (0 = the
    head's top draft); -1 where there is no target or it is the shared rare class `rare`,
    whose exported draft is one fixed rare token."""
    out = []
    for logits, tgt, m in _heads_and_targets(params, spec_cfg, hidden, tokens, mask):
        rank = jnp.sum(logits > jnp.take_along_axis(logits, tgt[..., None], axis=-1), axis=-1)
        out.append(jnp.where((m > 0) & (tgt != rare), rank, -1))
    return jnp.stack(out, axis=-1)


def simulated_tokens_per_forward(correct: np.ndarray, lengths: np.ndarray) -> float:
    """Tokens per verification forward of greedy speculative decoding over continuations whose
    draft correctness is `correct` [N, L, n_predict], lengths [N]. As in the engine: token 0
    comes from the prefill; from the last emitted token j the draft's leading correct heads
    are accepted and the verifier adds its own token, never past the end."""
    lead = np.cumprod(correct, axis=2).sum(axis=2)
    forwards = emitted = 0
    for row, n in zip(lead, lengths):
        j = 0
        while j < n - 1:
            e = min(int(row[j]) + 1, n - 1 - j)
            forwards, emitted, j = forwards + 1, emitted + e, j + e
    return emitted / max(forwards, 1)


def validate(
    params, spec_cfg: S.SpeculatorConfig, data: dict, idx: np.ndarray, lut: np.ndarray | None, batch: int = 16
) -> dict:
    """On examples `idx` of `data`: per-head top-1 and the simulated tokens per verification
    forward of the greedy draft, and of draft trees of 2 and 3 candidates (engine
    `speculative_candidates`: head 0's top 2 or 3, each continued greedily)."""
    rare = -1 if lut is None else int(lut.max())
    ranks = np.concatenate(
        [
            np.asarray(
                _target_ranks(params, spec_cfg, *make_batch(data, idx[b : b + batch], spec_cfg.n_predict, lut), rare)
            )
            for b in range(0, len(idx), batch)
        ]
    )
    mask = data["mask"][idx] > 0
    top1 = ranks == 0
    out = {f"val_acc_{i}": float(top1[..., i][mask].mean()) for i in range(spec_cfg.n_predict)}
    lengths = mask.sum(axis=1)
    out["val_tokens_per_forward"] = simulated_tokens_per_forward(top1, lengths)
    for c in (2, 3):
        tree = top1.copy()
        tree[..., 0] = (ranks[..., 0] >= 0) & (ranks[..., 0] < c)
        out[f"val_tokens_per_forward_{c}_candidates"] = simulated_tokens_per_forward(tree, lengths)
    return out


@dataclasses.dataclass(frozen=True)
class SpeculatorObjective:
    """`speculator_loss` on a batch (hidden, tokens, mask); per-head NLL and top-1 as metrics."""

    spec_cfg: S.SpeculatorConfig

    def context(self, frozen, batch):
        return None

    def loss(self, params, rng, frozen, batch, context):
        loss, (per_head, acc) = speculator_loss(params, self.spec_cfg, *batch)
        return loss, {"per_head": per_head, "acc": acc}


# ---------------------------------------------------------------------------- data


def _nq_rows(n: int) -> list[dict]:
    """nq-open-oracle records 0..n-1 (n <= 2000: the DEV split; the config checks it)."""
    return nq_open_oracle()[:n]


def _jsonl(path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def _jsonl_texts(path, n: int) -> list[str]:
    return [r["text"] for r in _jsonl(path)][:n]


def _jsonl_messages(path, n: int) -> list[list[dict]]:
    return [r["messages"] for r in _jsonl(path)][:n]


def _nq_passages(source, n: int) -> list[str]:
    return [passage_text(r) for r in _nq_rows(n)]


def _nq_questions(source, n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": r["question"]}] for r in _nq_rows(n)]


# data.stage1_source -> (source, n) -> n texts; any other source is a JSONL path of {"text": ...} lines.
STAGE1_SOURCES = {"nq_passages": _nq_passages}
# data.stage2_source -> (source, n) -> n chat prompts (message lists); any other source is a
# JSONL path of {"messages": [...]} lines.
STAGE2_SOURCES = {"nq_questions": _nq_questions}


def stage1_sequences(cfg: SpeculatorTrainConfig, tokenizer) -> list[list[int]]:
    d = cfg.data
    texts = STAGE1_SOURCES.get(d.stage1_source, _jsonl_texts)(d.stage1_source, d.stage1_examples)
    seqs = [list(tokenizer.encode(t))[: d.seq_len + 1] for t in texts]
    return [s for s in seqs if len(s) >= 2]


def chat_prompt(tokenizer, messages) -> list[int]:
    """Messages + the assistant header, encoded as span-query lowering encodes them."""
    return prompt_ids(tokenizer, messages) + list(tokenizer.generation_prefix_ids())


def stage2_prompts(cfg: SpeculatorTrainConfig, tokenizer) -> list[list[int]]:
    d = cfg.data
    msgs = STAGE2_SOURCES.get(d.stage2_source, _jsonl_messages)(d.stage2_source, d.stage2_prompts)
    return [chat_prompt(tokenizer, m) for m in msgs]


def generate_stage2(cfg: SpeculatorTrainConfig, model, path: Path) -> list[dict]:
    """The base model's continuations of the stage-2 prompts (each at `data.temperature`, then the
    first `data.sampled_prompts` again at `data.sample_temperature`), appended to `path` batch by
    batch (a killed run, or a run with more prompts or samples, continues after the rows there)."""
    d, eos = cfg.data, list(getattr(model.tokenizer, "eos_token_ids", ()) or model.cfg.eos_token_ids)
    prompts = stage2_prompts(cfg, model.tokenizer)
    jobs = [(p, d.temperature) for p in prompts] + [(p, d.sample_temperature) for p in prompts[: d.sampled_prompts]]
    rows = _jsonl(path) if path.exists() else []
    if [(r["prompt"], r.get("temperature", d.temperature)) for r in rows] != jobs[: len(rows)]:
        raise ValueError(f"{path} holds continuations of other prompts or temperatures; remove it")
    bar = progress(len(jobs), len(rows), "stage 2: base model generates")
    with open(path, "a") as f:
        for b in range(len(rows), len(jobs), d.gen_batch_size):
            chunk, temps = zip(*jobs[b : b + d.gen_batch_size])
            sps = [
                SamplingParams(max_tokens=d.max_new_tokens, temperature=t, seed=cfg.seed * 100003 + b + i)
                for i, t in enumerate(temps)
            ]
            new = [
                {
                    "prompt": p,
                    "temperature": sp.temperature,
                    "completion": list(r.token_ids) + (eos[:1] if r.finish_reason == "eos" else []),
                }
                for p, sp, r in zip(chunk, sps, generate(model, list(chunk), sps))
            ]
            f.write("".join(json.dumps(r) + "\n" for r in new))
            f.flush()
            os.fsync(f.fileno())
            rows.extend(new)
            bar.update(len(chunk))
    bar.close()
    return rows[: len(jobs)]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _hidden(params, cfg, tokens, positions):
    cache = llama.init_dense_cache(cfg, tokens.shape[0], tokens.shape[1])
    return llama.forward_dense(params, cfg, tokens, positions, cache)[0]


def base_hidden(model, seqs: list[list[int]], batch: int = 16) -> list[np.ndarray]:
    """The frozen base model's final hidden states [len(seq), H] of each sequence."""
    out = []
    for b in range(0, len(seqs), batch):
        chunk = seqs[b : b + batch]
        T = -(-max(map(len, chunk)) // 32) * 32  # multiples of 32: few compiled shapes, little padding
        toks = np.zeros((batch, T), np.int32)
        pos = np.full((batch, T), T, np.int32)  # padding writes past the cache: dropped
        for i, s in enumerate(chunk):
            toks[i, : len(s)], pos[i, : len(s)] = s, np.arange(len(s))
        h = np.asarray(_hidden(model.params, model.cfg, toks, pos))
        out.extend(h[i, : len(s)] for i, s in enumerate(chunk))
    return out


def build_examples(examples: list[tuple[np.ndarray, list[int]]], L: int, H: int):
    """(hidden [n, H], tokens [n]) pairs -> padded arrays hidden [N, L, H], tokens [N, L], mask [N, L]."""
    N = len(examples)
    hid = np.zeros((N, L, H), np.float32)
    tok = np.zeros((N, L), np.int32)
    mask = np.zeros((N, L), np.float32)
    for i, (h, t) in enumerate(examples):
        n = min(len(t), L)
        hid[i, :n], tok[i, :n], mask[i, :n] = h[:n], t[:n], 1.0
    return {"hidden": hid, "tokens": tok, "mask": mask}


def stage_data(cfg: SpeculatorTrainConfig, model, stage: int, run_dir: Path) -> dict:
    """Cached arrays of stage 1 or 2 (computed once into run_dir/cache). In a multi-host run
    process 0 builds them (and stage2.jsonl) while the others wait, then every process reads them."""
    path = run_dir / "cache" / f"stage{stage}.npz"
    if jax.process_count() > 1:
        if is_main_process() and not path.exists():
            _build_stage_data(cfg, model, stage, run_dir, path)
        multihost_utils.sync_global_devices(f"speculator stage {stage} data")
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    return _build_stage_data(cfg, model, stage, run_dir, path)


def _build_stage_data(cfg: SpeculatorTrainConfig, model, stage: int, run_dir: Path, path: Path) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    L, H = cfg.data.seq_len, model.cfg.hidden_size
    if stage == 1:
        seqs = stage1_sequences(cfg, model.tokenizer)
        hs = base_hidden(model, seqs)
        examples = [(h[:-1], s[1:]) for h, s in zip(hs, seqs)]
    else:
        rows = [r for r in generate_stage2(cfg, model, run_dir / "stage2.jsonl") if r["completion"]]
        seqs = [r["prompt"] + r["completion"] for r in rows]
        hs = base_hidden(model, seqs)
        examples = [(h[len(r["prompt"]) - 1 : -1], r["completion"]) for h, r in zip(hs, rows)]
    data = build_examples(examples, L, H)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)
    return data


def stage2_val_mask(cfg: SpeculatorTrainConfig, tokenizer, run_dir: Path) -> np.ndarray:
    """Per cached stage-2 example: is it a continuation of one of the last `data.val_prompts` prompts?"""
    prompts = stage2_prompts(cfg, tokenizer)
    val = {tuple(p) for p in prompts[len(prompts) - cfg.data.val_prompts :]} if cfg.data.val_prompts else set()
    rows = _jsonl(run_dir / "stage2.jsonl")[: len(prompts) + cfg.data.sampled_prompts]
    return np.array([tuple(r["prompt"]) in val for r in rows if r["completion"]], bool)


def make_batch(data: dict, idx: list[int], n_predict: int, lut: np.ndarray | None = None):
    pad = ((0, 0), (0, n_predict))
    tokens = data["tokens"][idx] if lut is None else lut[data["tokens"][idx]]
    return data["hidden"][idx], np.pad(tokens, pad), np.pad(data["mask"][idx], pad)


# ---------------------------------------------------------------------------- the run loop


def param_specs(spec_cfg: S.SpeculatorConfig, mesh) -> S.SpeculatorParams:
    """The speculator on a mesh: its embeddings and heads (what dominates its size) split over
    the vocabulary on `model` and over the inner dimension on `data` (FSDP), each where it
    divides the axis; the projections and norms replicated."""
    vocab = "model" if spec_cfg.vocab_size % mesh.shape["model"] == 0 else None
    inner = "data" if spec_cfg.dim % mesh.shape["data"] == 0 else None
    rep = PartitionSpec()
    return S.SpeculatorParams(
        emb=PartitionSpec(None, vocab, inner),  # [E, V, D]
        proj0=rep,
        proj=rep,
        ln_weight=rep,
        ln_bias=rep,
        head=PartitionSpec(None, inner, vocab),  # [E, D, V]
    )


def train(cfg: SpeculatorTrainConfig, model=None, crash_after_step: int | None = None) -> dict:
    """Train (or resume) the speculator run in `cfg.out_dir/cfg.name`; returns a summary dict.

    Outputs: config.yaml, stage2.jsonl (the base model's continuations), cache/ (hidden
    states), metrics.jsonl, checkpoints/ (Orbax), speculator/ (HF MLPSpeculator)."""
    run_dir = open_run_dir(cfg)
    model = load_model(cfg.model) if model is None else model
    data: dict[int, dict] = {}
    timings = {"data_s": 0.0, "train_s": 0.0}

    def load_stage(stage):
        if stage not in data:
            t0 = time.perf_counter()
            data[stage] = stage_data(cfg, model, stage, run_dir)
            timings["data_s"] += time.perf_counter() - t0
        return data[stage]

    # Example indices each stage trains on (stage 2 without its validation continuations).
    train_idx = {1: None, 2: None}
    val_idx = None
    if cfg.data.val_prompts:
        load_stage(2)  # generates stage2.jsonl, which the split reads
        is_val = stage2_val_mask(cfg, model.tokenizer, run_dir)
        train_idx[2], val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    lut = None
    if cfg.speculator.train_vocab:  # the training vocabulary depends on all the training data: prepare it first
        seen = lambda d, idx: d if idx is None else {"tokens": d["tokens"][idx], "mask": d["mask"][idx]}
        lut = train_vocab_lut(
            [seen(load_stage(s), train_idx[s]) for s, n in ((1, cfg.stage1_steps), (2, cfg.stage2_steps)) if n],
            cfg.speculator.train_vocab,
            model.cfg.vocab_size,
        )
    spec_cfg = speculator_config(cfg, model.cfg, None if lut is None else int(lut.max()) + 1)
    stage_of = lambda step: 1 if step < cfg.stage1_steps else 2

    def batch(step: int):
        stage = stage_of(step)
        d, pool = data[stage], train_idx[stage]
        local = step if stage == 1 else step - cfg.stage1_steps
        idx = batch_indices(len(d["tokens"]) if pool is None else len(pool), cfg.batch_size, local, cfg.seed + stage)
        return make_batch(d, idx if pool is None else pool[idx], spec_cfg.n_predict, lut)

    def log(step: int, metrics: dict) -> dict:
        m = jax.device_get(metrics)
        line = {"stage": stage_of(step), "loss": float(m["loss"])}
        line.update(grad_norm=float(m["grad_norm"]), lr=float(m["lr"]))
        line.update({f"loss_{i}": float(v) for i, v in enumerate(m["per_head"])})
        line.update({f"acc_{i}": float(v) for i, v in enumerate(m["acc"])})
        return line

    val = {}  # the last validation

    def evaluate(done: int, state: TrainState) -> dict:
        if val_idx is None or not (done % cfg.eval_every == 0 or done == cfg.steps):
            return {}
        # Multi-host: every process validates a host copy (the trained params span the processes).
        params = to_host(state.params) if jax.process_count() > 1 else state.params
        val.update(validate(params, spec_cfg, load_stage(2), val_idx, lut))
        return dict(val)

    def postfix(line: dict) -> dict:
        tpf = {"val_tpf": f"{val['val_tokens_per_forward']:.2f}"} if val else {}
        return dict(stage=line["stage"], loss=f"{line['loss']:.3f}", acc0=f"{line['acc_0']:.2f}", **tpf)

    recipe = Recipe(
        f"speculator {cfg.name}",
        S.init_speculator(spec_cfg, jax.random.PRNGKey(cfg.seed)),
        SpeculatorObjective(spec_cfg),
        None,
        batch,
        prepare=lambda step: load_stage(stage_of(step)),
        log=log,
        postfix=postfix,
        evals=[evaluate],
        param_specs=lambda mesh: param_specs(spec_cfg, mesh),
    )
    out = train_loop(cfg, run_dir, recipe, [] if crash_after_step is None else [crash_after(crash_after_step)])
    timings["train_s"] = out.step_s
    params = to_host(out.state.params)
    if lut is not None:
        params = expand_vocab(params, lut)
    if is_main_process():
        spec = S.Speculator(speculator_config(cfg, model.cfg), params)
        S.export_hf(spec, str(run_dir / "speculator"), base_model_name_or_path=cfg.model)
    return {"run_dir": str(run_dir), "steps": cfg.steps, "resumed_from": out.resumed_from, **timings, **val}
