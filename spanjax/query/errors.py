"""The one error type of the query language.

Every problem found before compute (syntax, wrong type, unknown node, bad value)
is a `SpanQueryError` naming the JSON path of the offending node
(`$.g.input.cross[2].plus[0]`), what was found and what was expected, and for
text forms the 1-based line and column.
"""

from __future__ import annotations


class SpanQueryError(ValueError):
    def __init__(self, path: str, found: str, expected: str, line: int | None = None, col: int | None = None):
        self.path = path
        self.found = found
        self.expected = expected
        self.line = line
        self.col = col
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" (line {self.line}, column {self.col})" if self.line is not None else ""
        return f"{self.path}{where}: found {self.found}; expected {self.expected}"

    def __reduce__(self):  # picklable across processes (args differ from str)
        return (SpanQueryError, (self.path, self.found, self.expected, self.line, self.col))


def describe(value: object, limit: int = 40) -> str:
    """Short human description of a parsed value, for the `found` part of an error."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        s = value if len(value) <= limit else value[:limit] + "..."
        return f"string {s!r}"
    if isinstance(value, dict):
        keys = list(value)[:6]
        more = ", ..." if len(value) > 6 else ""
        return "empty object" if not value else f"object with keys {', '.join(map(repr, keys))}{more}"
    if isinstance(value, list):
        return "empty list" if not value else f"list of {len(value)} item(s)"
    return type(value).__name__
