"""Paired comparison of locality variants that live in different run directories.

    python -m spanjax.eval.locality_pairs RUN_DIR VARIANT --against MAIN_RUN_DIR stock span-parallel+alora \
        --out docs/results/locality_reweight_alora.json

`spanjax merge` joins runs of one configuration; a variant run with another setting (e.g. its
own re-weighting) cannot join them, but its items still pair with theirs by (question, gold
position). Per position and overall, McNemar's exact test (eval/stats.py) of VARIANT against
each listed variant, on the items both answered; overall pairs one item per question where
both variants are order-invariant (one query per question, recorded at every position), else
every (question, position), as the locality table does against stock.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spanjax.eval.stats import paired_test, wilson
from spanjax.runs import ITEMS_FILE, read_items
from spanjax.tasks.locality import order_invariant


def correct_by_item(run_dir: str | Path, variant: str) -> dict[tuple[int, int], bool]:
    """(question, position) -> correct, for one variant's finished items in a run directory."""
    items = read_items(Path(run_dir) / ITEMS_FILE).values()
    return {(r["question"], r["position"]): bool(r["correct"]) for r in items if r["variant"] == variant}


def first_of_each_question(keys) -> list[tuple[int, int]]:
    """The (question, position) keys at each question's first position: one item per question
    of an order-invariant variant (the same query recorded at every position)."""
    first = {q: p for q, p in sorted(keys, reverse=True)}
    return sorted(first.items())


def compare(variant: str, mine: dict, other_variant: str, other: dict) -> dict:
    """McNemar's exact test of `mine` (first) against `other` per position and overall."""
    keys = sorted(set(mine) & set(other))
    one_per_question = order_invariant(variant) and order_invariant(other_variant)
    positions = sorted({p for _, p in keys})
    return {
        "all": paired_test((mine[k], other[k]) for k in (first_of_each_question(keys) if one_per_question else keys)),
        "per_position": [
            {
                "position": p,
                "accuracy": sum(other[k] for k in keys if k[1] == p) / sum(1 for k in keys if k[1] == p),
                **paired_test((mine[k], other[k]) for k in keys if k[1] == p),
            }
            for p in positions
        ],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("variant")
    ap.add_argument(
        "--against", nargs="+", required=True, metavar="RUN_DIR VARIANT", help="a run directory, then variants in it"
    )
    ap.add_argument("--out", help="write the comparison as JSON here")
    args = ap.parse_args(argv)
    mine = correct_by_item(args.run_dir, args.variant)
    if not mine:
        raise SystemExit(f"{args.run_dir}: no finished item of {args.variant!r}")
    counted = first_of_each_question(mine) if order_invariant(args.variant) else list(mine)
    k, n = sum(mine[key] for key in counted), len(counted)
    result = {"run_dir": args.run_dir, "variant": args.variant, "correct": k, "n": n, "accuracy": k / n}
    result["wilson95"] = wilson(k, n)
    result["against"] = {}
    main_dir, *variants = args.against
    for v in variants:
        other = correct_by_item(main_dir, v)
        if not other:
            raise SystemExit(f"{main_dir}: no finished item of {v!r}")
        result["against"][v] = {"run_dir": main_dir, **compare(args.variant, mine, v, other)}
        t = result["against"][v]["all"]
        print(f"{args.variant} vs {v}: b={t['b']} c={t['c']} p={t['p']:.3g} over {t['n_pairs']} pairs")
    print(f"{args.variant}: {k}/{n} = {k / n:.3f} [{result['wilson95'][0]:.3f}, {result['wilson95'][1]:.3f}]")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
