"""`spanjax plan-memory`: per-device memory of a model on a mesh, and the largest KV pool.

    spanjax plan-memory --model configs/models/llama-3-70b-instruct/config.json \\
        --mesh data=1,model=8 --device-memory 80GB
    python -m spanjax.cli.memory --model configs/models/granite-3.3-8b-instruct --mesh model=8 \\
        --device-memory 80GiB --json

Only config.json is read (a file, or a directory holding one): shapes are traced with
`jax.eval_shape`, no weight is loaded or allocated (spanjax/models/memory.py).
`add_arguments` / `run` are the subcommand pair for spanjax/cli/main.py's `COMMANDS`;
`run` reports its own user errors (one line on stderr, exit 2), as `main` does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

EXIT_USER_ERROR = 2

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '16e9', '1.5TB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"device memory {text!r}: expected a size such as 80GB, 80GiB or 16e9")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"device memory {text!r}: must be positive")
    return size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="CONFIG", help="a Hugging Face config.json, or its directory")
    p.add_argument("--mesh", default="data=1,model=1", help="mesh axes, e.g. data=2,model=4 (default: one device)")
    p.add_argument("--device-memory", required=True, metavar="SIZE", help="memory of one device: 80GB, 80GiB, 16e9")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    p.add_argument(
        "--cache-dtype", default=None, choices=["float32", "bfloat16", "float16"], help="KV dtype (default: --dtype)"
    )
    p.add_argument("--page-size", type=int, default=16, help="KV page size in tokens (default 16)")
    p.add_argument("--max-tokens-per-step", type=int, default=512, help="tokens in one engine step (default 512)")
    p.add_argument("--max-seqs-per-step", type=int, default=32, help="sampled rows in one step (default 32)")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of memory kept free (default 0.10)")
    p.add_argument("--rules", default="inference", choices=["inference", "training"], help="sharding rules")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def _config(path: str):
    """ModelConfig from a config.json file or a directory holding one (nothing else is read)."""
    from spanjax.models.hf import CONFIG_FILE, config_from_hf

    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read model config {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config_from_hf(raw, path)


def run(args: argparse.Namespace) -> int:
    from spanjax.models.errors import WeightLoadError
    from spanjax.models.memory import plan_memory
    from spanjax.models.sharding import parse_mesh

    try:
        plan = plan_memory(
            _config(args.model),
            parse_mesh(args.mesh),
            parse_size(args.device_memory),
            dtype=args.dtype,
            cache_dtype=args.cache_dtype,
            page_size=args.page_size,
            max_tokens_per_step=args.max_tokens_per_step,
            max_seqs_per_step=args.max_seqs_per_step,
            headroom=args.headroom,
            rules=args.rules,
        )
    except (ValueError, WeightLoadError) as e:
        if os.environ.get("SPANJAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(plan.to_json() if args.json else f"{args.model}\n{plan.format()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spanjax plan-memory", description="Per-device memory of a model on a mesh, from its config.json alone."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
