"""The one error type of the query language.

Every problem found before compute (syntax, wrong type, unknown node, bad value)
is a `SpanQueryError` naming the JSON path of the offending node
(`$.g.input.cross[2].plus[0]`), what was found and what was expected, and for
text forms the 1-based line and column.
"""

from __future__ import annotations

# Messages are bounded: the input may be hostile (1 MB of NUL bytes once made a 4 MB line).
MAX_FOUND_CHARS = 200  # `found` / `expected` descriptions
MAX_PATH_CHARS = 400  # the path, shortened in the middle (both ends say where)
MAX_MESSAGE_CHARS = 1000  # the whole str(error)
# Integers past this many bits are described by size: repr() of a huge int is slow and
# raises past Python's 4,300-digit int-to-string limit.
MAX_DESCRIBED_INT_BITS = 256


def clip(s: str, limit: int) -> str:
    """`s` cut to at most `limit` characters, ending in "..." when cut."""
    return s if len(s) <= limit else s[: max(0, limit - 3)] + "..."


def _clip_middle(s: str, limit: int) -> str:
    if len(s) <= limit:
        return s
    half = (limit - 3) // 2
    return s[:half] + "..." + s[len(s) - half :]


class SpanQueryError(ValueError):
    def __init__(self, path: str, found: str, expected: str, line: int | None = None, col: int | None = None):
        self.path = path
        self.found = clip(str(found), MAX_FOUND_CHARS)
        self.expected = clip(str(expected), MAX_FOUND_CHARS)
        self.line = line
        self.col = col
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" (line {self.line}, column {self.col})" if self.line is not None else ""
        path = _clip_middle(str(self.path), MAX_PATH_CHARS)
        return clip(f"{path}{where}: found {self.found}; expected {self.expected}", MAX_MESSAGE_CHARS)

    def __reduce__(self):  # picklable across processes (args differ from str)
        return (SpanQueryError, (self.path, self.found, self.expected, self.line, self.col))


def describe(value: object, limit: int = 40) -> str:
    """Short human description of a parsed value, for the `found` part of an error."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int) and value.bit_length() > MAX_DESCRIBED_INT_BITS:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        s = value if len(value) <= limit else value[:limit] + "..."
        return f"string {s!r}"
    if isinstance(value, dict):
        keys = list(value)[:6]
        more = ", ..." if len(value) > 6 else ""
        shown = ", ".join(clip(repr(k), limit) for k in keys)
        return "empty object" if not value else f"object with keys {shown}{more}"
    if isinstance(value, list):
        return "empty list" if not value else f"list of {len(value)} item(s)"
    return type(value).__name__
