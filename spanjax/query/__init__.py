"""Span-query language: AST, parsers/printers (JSON, YAML, s-expression),
validation, optimizer passes, lowering to a span plan.

Engine-facing API:
    parse(text_or_bytes, fmt=None) -> Query         (syntax.py; SpanQueryError on any problem)
    prepare(q) -> Query                             (passes.py: expand (zip, repeat, map), flatten, dedup, hoist)
    prints(q) -> list[str]                          (the print messages, to log; call before prepare)
    evaluation_order(q) -> list[list[G]]; ready(q) -> list[G]
    substitute(q, {G: GenResult | str}) -> Query; value(q)
    spanjax.query.lower.lower(g, tokenizer, *, page_size, model=None, adapter=None) -> SpanPlan
    spanjax.query.page_keys.chain_page_key(prev_key, page_tokens) -> str
(`spanjax.query.lower` stays the *module* here, so `from spanjax.query import
lower` gives the module; the function is also exported as `lower_g`.)
    SpanPlan.sequence_page_keys(generated_ids)      (plan.py)
Limits for untrusted input: MAX_QUERY_BYTES (text size), MAX_DEPTH (nesting),
MAX_GENERATIONS (g's with repeats and maps multiplied out), MAX_EXPANDED_NODES (the
prepared tree); every problem is a SpanQueryError.
"""

from spanjax.query import lower  # noqa: F401  (the module; see docstring)
from spanjax.query.ast import (
    Cross,
    G,
    Map,
    Message,
    Monad,
    Par,
    Plus,
    Print,
    Query,
    Repeat,
    Seq,
    Zip,
    assistant,
    system,
    user,
)
from spanjax.query.errors import SpanQueryError
from spanjax.query.lower import lower as lower_g
from spanjax.query.page_keys import chain_page_key, chain_page_keys, root_key
from spanjax.query.passes import (
    GenResult,
    dedup,
    evaluation_order,
    expand,
    expand_bulk,
    expand_repeat,
    expand_zip,
    flatten,
    hoist,
    prepare,
    prints,
    ready,
    substitute,
    value,
)
from spanjax.query.plan import Span, SpanPlan
from spanjax.query.syntax import (
    MAX_QUERY_BYTES,
    dump,
    parse,
    parse_json,
    parse_sexpr,
    parse_yaml,
    to_data,
    to_json,
    to_sexpr,
    to_yaml,
)
from spanjax.query.validate import MAX_DEPTH, MAX_EXPANDED_NODES, MAX_GENERATIONS, from_data

__all__ = [
    "G",
    "Cross",
    "Map",
    "Message",
    "Monad",
    "Par",
    "Plus",
    "Print",
    "Query",
    "Repeat",
    "Seq",
    "Zip",
    "assistant",
    "system",
    "user",
    "SpanQueryError",
    "lower",
    "lower_g",
    "chain_page_key",
    "chain_page_keys",
    "root_key",
    "GenResult",
    "dedup",
    "evaluation_order",
    "expand",
    "expand_bulk",
    "expand_repeat",
    "expand_zip",
    "flatten",
    "hoist",
    "prepare",
    "prints",
    "ready",
    "substitute",
    "value",
    "Span",
    "SpanPlan",
    "dump",
    "parse",
    "parse_json",
    "parse_sexpr",
    "parse_yaml",
    "to_data",
    "to_json",
    "to_sexpr",
    "to_yaml",
    "MAX_DEPTH",
    "MAX_EXPANDED_NODES",
    "MAX_GENERATIONS",
    "MAX_QUERY_BYTES",
    "from_data",
]
