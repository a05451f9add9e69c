"""`spanjax query plan FILE`: print the span plan of every g in a query file.

The file is JSON, YAML or an s-expression (by extension, else sniffed). The
query goes through `passes.prepare` (repeat expansion, flatten, dedup,
hoisting); g's are lowered wave by wave in evaluation order. Nothing is
generated, so inner g's results are placeholders: the assistant message
"<output of g N>" encoded with the tokenizer (the real plan has the generated
ids there instead).
"""

from __future__ import annotations

import argparse
import sys

from spanjax.query import passes, syntax
from spanjax.query.errors import SpanQueryError
from spanjax.query.lower import lower


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", metavar="FILE", help="query file (.json, .yaml/.yml, .sexp/.sexpr; else sniffed), '-' for stdin"
    )
    parser.add_argument(
        "--format", choices=syntax.FORMATS, default=None, help="input form (default: by extension or sniffed)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model that runs every g: its tokenizer lowers the prompts and its name keys the cache "
        "(default: each g's model)",
    )
    parser.add_argument(
        "--fake-tokenizer", action="store_true", help="byte-level stand-in tokenizer (offline; structure only)"
    )
    parser.add_argument("--page-size", type=int, default=16, help="KV page size (default 16)")
    parser.add_argument(
        "--no-optimize", action="store_true", help="skip flatten/dedup/hoist (repeat is still expanded)"
    )
    parser.add_argument("--show-query", action="store_true", help="also print the prepared query as an s-expression")
    parser.add_argument("--mask", action="store_true", help="also print the token-level visibility mask (small plans)")


def _tokenizer(name: str | None, fake: bool, cache: dict):
    if fake or name is None:
        from spanjax.query.fake import ByteTokenizer

        return ByteTokenizer()
    if name not in cache:
        try:
            from spanjax.models.loading import load_tokenizer

            cache[name] = load_tokenizer(name)
        except Exception as e:  # offline or not a loadable model: say so, keep going
            from spanjax.query.fake import ByteTokenizer

            print(
                f"warning: cannot load tokenizer for {name!r} ({type(e).__name__}: {e}); using --fake-tokenizer",
                file=sys.stderr,
            )
            cache[name] = ByteTokenizer()
    return cache[name]


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def plan_query(q, *, tokenizer_for, page_size: int, optimize: bool = True, model: str | None = None):
    """Yield (wave index, g, plan) for every g of `q` in evaluation order, with
    placeholder results substituted for inner g's."""
    q = passes.prepare(q) if optimize else passes.expand_repeat(q)
    w = 0
    counter = 0
    while True:
        wave = passes.ready(q)
        if not wave:
            return
        results = {}
        for g in wave:
            tok = tokenizer_for(g.model)
            plan = lower(g, tok, page_size=page_size, model=model)
            yield w, g, plan
            counter += 1
            text = f"<output of g {counter}>"
            results[g] = passes.GenResult(text, tuple(tok.encode(text)))
        q = passes.substitute(q, results)
        w += 1


def run_plan(args) -> int:
    try:
        raw = _read(args.file)
        fmt = args.format or (syntax.format_for_path(args.file) if args.file != "-" else None)
        q = syntax.parse(raw, fmt)
        if args.show_query:
            shown = passes.prepare(q) if not args.no_optimize else passes.expand_repeat(q)
            print(syntax.to_sexpr(shown))
            print()
        cache: dict = {}

        def tokenizer_for(model):
            return _tokenizer(args.model or model, args.fake_tokenizer, cache)

        n = 0
        for w, g, plan in plan_query(
            q, tokenizer_for=tokenizer_for, page_size=args.page_size, optimize=not args.no_optimize, model=args.model
        ):
            n += 1
            print(
                f"== g {n} (wave {w}): model={g.model} max_tokens={g.max_tokens} "
                f"temperature={g.temperature} seed={g.seed}"
            )
            print(plan.format(tokenizer_for(g.model)))
            if args.mask:
                m = plan.dense_mask()
                for row in m:
                    print("        " + "".join("#" if v else "." for v in row))
            print()
        if n == 0:
            print("(no g in the query: nothing to lower)")
        return 0
    except SpanQueryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:  # standalone: python -m spanjax.cli.plan FILE
    parser = argparse.ArgumentParser(prog="spanjax query plan", description="Print the span plan of a query.")
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
