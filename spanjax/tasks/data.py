"""Readers for the task data in shared/data beside the repository checkout (see its README).

Questions 0..1999 of nq-open-oracle are for development and training;
2000..2654 are held out for reported numbers. Callers pass the split.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

DEV = range(0, 2000)
HELD_OUT = range(2000, 2655)


def data_dir() -> Path:
    """`$SPANJAX_DATA`, else the `shared/data` folder beside the repository checkout."""
    env = os.environ.get("SPANJAX_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _read_jsonl_gz(name: str) -> list[dict]:
    path = data_dir() / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: set SPANJAX_DATA to the directory holding the evaluation data "
            "(default: shared/data beside the checkout)"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def nq_open_oracle() -> list[dict]:
    """2,655 records: question, answers, ctxs (one gold passage: title, text)."""
    return _read_jsonl_gz("nq-open-oracle.jsonl.gz")


def kv_retrieval() -> list[dict]:
    """500 records: ordered_kv_records (75 UUID pairs), key, value."""
    return _read_jsonl_gz("kv-retrieval-75_keys.jsonl.gz")


def passage_text(record: dict) -> str:
    """The record's gold passage as a document body: "(Title: ...) text"."""
    ctx = record["ctxs"][0]
    return f"(Title: {ctx['title']}) {ctx['text']}"
