"""The `spanjax` command line.

Each subcommand is a pair in `COMMANDS`: a function that adds its arguments to
an argparse subparser, and a function that runs it and returns an exit code.
Add a subcommand (query, run, train, eval, ...) by writing the two functions
and one `COMMANDS` entry; nothing else changes.

User errors (bad arguments, missing model, bad input) print one line to stderr
and exit 2; tracebacks are kept for bugs (set SPANJAX_DEBUG=1 to see them for
user errors too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

from spanjax.cli import memory  # argparse and re only: the command list stays fast

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user can fix; reported as one line, without a traceback."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Imported lazily so `spanjax --help` stays fast.
    from spanjax.engine.scheduler import RequestTooLarge
    from spanjax.models.errors import WeightLoadError
    from spanjax.query.errors import SpanQueryError
    from spanjax.tokenizer import ChatTemplateError

    return (UserError, WeightLoadError, ChatTemplateError, FileNotFoundError, SpanQueryError, RequestTooLarge)


def _initialize_distributed() -> None:
    """Join the multi-host runtime the environment describes (SPANJAX_COORDINATOR,
    SPANJAX_NUM_PROCESSES, SPANJAX_PROCESS_ID: spanjax/distributed.py) before JAX starts;
    nothing on one host."""
    from spanjax import distributed

    try:
        distributed.initialize()
    except ValueError as e:
        raise UserError(str(e)) from e


# ---------------------------------------------------------------------------- generate


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registry name (smollm2-135m), HF directory or .gguf file")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as one user turn with the model's chat template"
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop strings (the text is cut before them)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _add_quantized_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")


def _run_generate(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from spanjax.engine.dense_generate import complete
    from spanjax.engine.sampling import SamplingParams
    from spanjax.models.loading import load_model

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        sampling = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=tuple(args.stop),
        )
    except ValueError as e:
        raise UserError(str(e)) from e

    t0 = time.perf_counter()
    model = load_model(args.model, dtype=getattr(jnp, args.dtype), quantized=args.quantized)
    t1 = time.perf_counter()
    try:
        result = complete(model, prompt, sampling, chat=args.chat)
    except ValueError as e:  # prompt too long, empty prompt, ...
        raise UserError(str(e)) from e
    t2 = time.perf_counter()

    if not args.json:
        print(result.text)
        return 0
    n = len(result.token_ids)
    out = {
        "model": model.name,
        "text": result.text,
        "token_ids": [int(t) for t in result.token_ids],
        "prompt_tokens": int(result.prompt_tokens),
        "completion_tokens": n,
        "finish_reason": result.finish_reason,
        "timings": {
            "load_s": round(t1 - t0, 4),
            "prefill_s": round(float(result.prefill_s), 4),
            "decode_s": round(float(result.decode_s), 4),
            "total_s": round(t2 - t1, 4),
            "decode_tokens_per_s": round(n / result.decode_s, 2) if n > 1 and result.decode_s > 0 else None,
        },
        "sampling": dataclasses.asdict(sampling),
    }
    print(json.dumps(out, ensure_ascii=False))
    return 0


# ---------------------------------------------------------------------------- query


def _add_quantized_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantized",
        action="store_true",
        help="keep a GGUF's Q4_0/Q4_1/Q8_0 weights as stored (CPU decode reads 4-bit weights; same values)",
    )


def _add_mesh_arg(p: argparse.ArgumentParser, what: str) -> None:
    """--mesh for the commands that build an Engine (checked when the EngineConfig is made)."""
    p.add_argument(
        "--mesh",
        metavar="data=D,model=M",
        help=f"device mesh of {what}, over all devices: model=M splits heads, MLP and KV pool "
        "(tensor parallelism); one device if not given (docs/scaling.md)",
    )


def _add_query_args(p: argparse.ArgumentParser) -> None:
    from spanjax.cli.plan import add_plan_arguments

    p.usage = "spanjax query [plan] FILE [options]"
    add_plan_arguments(p)  # FILE, --format, --model, --page-size, --fake-tokenizer, --no-optimize, --show-query, --mask
    p.add_argument("plan_file", nargs="?", metavar="PLAN_FILE", help=argparse.SUPPRESS)  # `query plan FILE`
    p.add_argument("--num-pages", type=int, default=2048, help="KV pages in the engine's pool (default 2048)")
    p.add_argument("--max-tokens-per-step", type=int, default=256, help="token budget per engine step (default 256)")
    _add_quantized_arg(p)
    p.add_argument(
        "--int8-activations",
        action="store_true",
        help="with --quantized (implied): decode products with int8 activations, as llama.cpp computes "
        "them (faster on AVX512-VNNI CPUs; results no longer the dequantized model's)",
    )

    _add_mesh_arg(p, "the engine")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: text, prompt_tokens, cached_tokens, ttft_s, generations",
    )


def _run_query(args: argparse.Namespace) -> int:
    """`spanjax query FILE` runs the query; `spanjax query plan FILE` prints its span plans."""
    if args.file == "plan":
        if args.plan_file is None:
            raise UserError("usage: spanjax query plan FILE")
        from spanjax.cli.plan import run_plan

        args.file = args.plan_file
        return run_plan(args)
    if args.plan_file is not None:
        raise UserError(f"unexpected argument {args.plan_file!r} (did you mean 'spanjax query plan FILE'?)")
    _initialize_distributed()  # every host runs the query (one engine over all their devices); process 0 prints

    from spanjax.compilation import use_persistent_cache
    from spanjax.engine.engine import Engine, EngineConfig
    from spanjax.engine.executor import run_query
    from spanjax.models.loading import load_model
    from spanjax.query import syntax

    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
        query = syntax.parse(raw, args.format or (syntax.format_for_path(args.file) if args.file != "-" else None))
    except OSError as e:
        raise UserError(f"cannot read query file: {e}") from e
    use_persistent_cache()  # before loading: the loader's own jitted ops are cached too
    try:
        engine_cfg = EngineConfig(
            num_pages=args.num_pages,
            page_size=args.page_size,
            max_tokens_per_step=args.max_tokens_per_step,
            mesh=args.mesh,
            int8_activations=args.int8_activations,
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    model = load_model(args.model or "smollm2-135m", quantized=args.quantized or args.int8_activations)
    try:
        engine = Engine(model, engine_cfg)
    except ValueError as e:  # a mesh the devices or the model's head counts do not fit
        raise UserError(str(e)) from e
    try:
        result = run_query(engine, query, optimize=not args.no_optimize)
    except ValueError as e:  # too long for the context or the pool, model mismatch
        raise UserError(str(e)) from e
    from spanjax import distributed

    if not distributed.is_main_process():
        return 0
    if args.json:
        out = result.to_json()
        out["model"] = model.name
        out["engine"] = engine.stats()
        print(json.dumps(out, ensure_ascii=False))
    else:
        value = result.value
        print(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=2))
    return 0


# ---------------------------------------------------------------------------- run / eval

# `spanjax eval NAME` = `spanjax run configs/<preset>`.
EVAL_PRESETS = {
    "locality": "locality_nq.yaml",
    "locality-kv": "locality_kv.yaml",
    "ttft-rag": "ttft_rag.yaml",
    "ttft-nested": "ttft_nested.yaml",
}


def _configs_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "configs"


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="experiment YAML (configs/*.yaml)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. eval.num_docs=10 model=smollm2-135m"
    )
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue runs/<dir>: finished items are skipped (the config must match)"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _add_mesh_arg(p, "the experiment's engine")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", choices=sorted(EVAL_PRESETS), help="which experiment (a preset in configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. eval.num_questions=20")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue runs/<dir>: finished items are skipped")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _add_mesh_arg(p, "the experiment's engine")


def _run_run(args: argparse.Namespace) -> int:
    from spanjax.config import ConfigError, dump
    from spanjax.eval.experiments import load_config, run

    overrides = list(args.overrides) + ([f"engine.mesh={args.mesh}"] if args.mesh else [])
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(dump(cfg), end="")
            return 0
        _initialize_distributed()  # so a multi-host launch is refused in one line, not run once per host
        results, run_dir = run(cfg, resume=args.resume)
    except ConfigError as e:
        raise UserError(str(e)) from e
    md = results.get("table_markdown")
    if md:
        print(md)
    print(f"results: {run_dir.path}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    args.config = str(_configs_dir() / EVAL_PRESETS[args.preset])
    return _run_run(args)


def _add_merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="locality run directories (e.g. the shards of a run)")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged run directory (new)")


def _run_merge(args: argparse.Namespace) -> int:
    """Merge locality run directories (eval/merge.py) and print the merged table."""
    from spanjax.config import ConfigError
    from spanjax.eval.merge import MergeError, merge

    try:
        results, run_dir = merge(args.run_dirs, args.out)
    except (ConfigError, MergeError) as e:
        raise UserError(str(e)) from e
    print(results["table_markdown"])
    print(f"results: {run_dir.path}")
    return 0


# ---------------------------------------------------------------------------- train


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "kind",
        choices=["alora", "lora", "block-adapter", "speculator"],
        help="adapter kind (sets adapter.kind); block-adapter: the preset's adapter, block-attention data "
        "(configs/block_alora.yaml); "
        "speculator: MLP speculator heads (configs/speculator_smollm2.yaml)",
    )
    p.add_argument("config", metavar="CONFIG", help="training YAML (configs/alora_answerability.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. steps=50 adapter.r=4")
    p.add_argument(
        "--mesh",
        metavar="data=D,model=M",
        help="train on a D x M device mesh (the `mesh` setting; default one device). Multi-host: run the same "
        "command on every host with SPANJAX_COORDINATOR, SPANJAX_NUM_PROCESSES, SPANJAX_PROCESS_ID set",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _train_overrides(args: argparse.Namespace, *extra: str) -> list[str]:
    return [*args.overrides, *extra, *([f"mesh={args.mesh}"] if args.mesh else [])]


def _run_train(args: argparse.Namespace) -> int:
    """Train (resuming from the run directory's last checkpoint, if any) and export the adapter."""
    _initialize_distributed()

    from spanjax.config import ConfigError, dump, load
    from spanjax.training.config import TrainConfig
    from spanjax.training.trainer import train

    if args.kind == "speculator":
        return _run_train_speculator(args)
    try:
        block = args.kind == "block-adapter"
        cfg = load(
            TrainConfig,
            args.config,
            _train_overrides(args) if block else _train_overrides(args, f"adapter.kind={args.kind}"),
        )
        if block and cfg.data.source != "nq_blocks":
            raise UserError(
                f"train block-adapter: {args.config} has data.source={cfg.data.source!r}; "
                "expected nq_blocks (configs/block_alora.yaml)"
            )
        if args.print_config:
            print(dump(cfg), end="")
            return 0
        summary = train(cfg)
    except (ConfigError, ValueError) as e:
        raise UserError(str(e)) from e
    print(json.dumps(summary, indent=2))
    return 0


def _run_train_speculator(args: argparse.Namespace) -> int:
    """Train (or resume) MLP speculator heads and export them in the HF MLPSpeculator format."""
    from spanjax.config import ConfigError, dump, load
    from spanjax.training.speculator import train
    from spanjax.training.speculator_config import SpeculatorTrainConfig

    try:
        cfg = load(SpeculatorTrainConfig, args.config, _train_overrides(args))
        if args.print_config:
            print(dump(cfg), end="")
            return 0
        summary = train(cfg)
    except (ConfigError, ValueError) as e:
        raise UserError(str(e)) from e
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------- serve


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name (smollm2-135m), HF directory or .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", metavar="ENGINE_YAML", help="EngineConfig fields as YAML (num_pages, page_size, ...)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _add_quantized_arg(p)
    _add_mesh_arg(p, "the engine (overrides the config's)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (all but /health)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve a PEFT LoRA / aLoRA directory as model NAME (repeatable; more at run time: /v1/load_lora_adapter)",
    )
    p.add_argument("--max-pending", type=int, default=256, help="HTTP requests in flight before 429 (default 256)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is aborted")


def _run_serve(args: argparse.Namespace) -> int:
    """Load the model, build one engine and serve it (docs/server.md) until SIGTERM / Ctrl-C."""
    import jax.numpy as jnp

    from spanjax.compilation import use_persistent_cache
    from spanjax.config import ConfigError, load
    from spanjax.engine.engine import Engine, EngineConfig
    from spanjax.models.loading import load_model
    from spanjax.server import ServerConfig, serve
    from spanjax.server.app import load_adapter

    adapters = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {spec!r}: expected NAME=PATH")
        adapters.append((name, path))
    try:
        engine_cfg = load(EngineConfig, args.config) if args.config else EngineConfig(num_pages=2048)
        if args.mesh:
            engine_cfg = dataclasses.replace(engine_cfg, mesh=args.mesh)
        server_cfg = ServerConfig(
            api_key=args.api_key, max_pending=args.max_pending, request_timeout_s=args.request_timeout
        )
    except (ConfigError, ValueError) as e:
        raise UserError(str(e)) from e
    use_persistent_cache(engine_cfg.compilation_cache)
    quantized = args.quantized or engine_cfg.int8_activations  # int8 activations need the blocks
    model = load_model(args.model, dtype=getattr(jnp, args.dtype), quantized=quantized)
    try:
        engine = Engine(model, engine_cfg)
    except ValueError as e:  # a mesh the devices or the model's head counts do not fit
        raise UserError(str(e)) from e
    for name, path in adapters:
        try:
            engine.register_adapter(name, load_adapter(path, engine))
        except (OSError, ValueError) as e:
            raise UserError(f"--adapter {name}={path}: {e}") from e
    serve(engine, host=args.host, port=args.port, config=server_cfg)
    return 0


# ---------------------------------------------------------------------------- table + main


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "generate": Command("generate a completion of one prompt", _add_generate_args, _run_generate),
    "query": Command(
        "run a span query file (JSON, YAML or s-expression), or print its plan: query plan FILE",
        _add_query_args,
        _run_query,
    ),
    "run": Command("run an experiment config: run CONFIG [KEY=VALUE ...] [--resume RUN_DIR]", _add_run_args, _run_run),
    "eval": Command(
        "run an experiment preset: eval locality|locality-kv|ttft-rag|ttft-nested [KEY=VALUE ...]",
        _add_eval_args,
        _run_eval,
    ),
    "merge": Command(
        "merge locality run directories (shards: eval.shard=i/k) into one: merge RUN_DIR... --out DIR",
        _add_merge_args,
        _run_merge,
    ),
    "train": Command(
        "train a LoRA / aLoRA adapter or MLP speculator heads: "
        "train alora|lora|block-adapter|speculator CONFIG [KEY=VALUE ...] (resumes its run dir)",
        _add_train_args,
        _run_train,
    ),
    "serve": Command(
        "serve one engine over HTTP: spnl's /v1/query/execute and the OpenAI API (docs/server.md)",
        _add_serve_args,
        _run_serve,
    ),
    "plan-memory": Command(
        "per-device parameter, KV and activation bytes of a model config on a mesh, and the largest KV pool",
        memory.add_arguments,
        memory.run,
    ),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spanjax", description="Span queries over a paged, content-addressed KV cache.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_args(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("spanjax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _user_error_types()) or os.environ.get("SPANJAX_DEBUG"):
            raise
        message = " ".join(str(e).split())  # one line
        print(f"spanjax {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
