"""Pairing a variant from its own run directory with another run's items (eval/locality_pairs.py),
against McNemar counts computed here by hand."""

import json

from spanjax.eval import locality_pairs as LP


def write_items(path, variant, correct):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "items.jsonl", "w") as f:
        for (q, p), c in correct.items():
            rec = {"key": [variant, q, p], "variant": variant, "question": q, "position": p, "correct": c}
            f.write(json.dumps(rec) + "\n")


def test_pairs_by_item_and_once_per_question_between_order_invariant_variants(tmp_path):
    qs, ps = range(10), range(3)
    mine = {(q, p): q % 2 == 0 for q in qs for p in ps}  # order-invariant: the same at every position
    plain = {(q, p): q % 3 == 0 for q in qs for p in ps}
    stock = {(q, p): (q + p) % 2 == 1 for q in qs for p in ps}
    stock.pop((9, 2))  # an item the other run never finished: not paired
    write_items(tmp_path / "a", "span-parallel-reweight+alora", mine)
    write_items(tmp_path / "b", "span-parallel+alora", plain)
    with open(tmp_path / "b" / "items.jsonl", "a") as f:
        f.write('{"torn line\n')  # a killed run's last line is skipped
    write_items(tmp_path / "c", "stock", stock)
    out = LP.main(
        [str(tmp_path / "a"), "span-parallel-reweight+alora", "--against", str(tmp_path / "b"), "span-parallel+alora"]
    )
    assert (out["correct"], out["n"]) == (5, 10)  # one query per question
    t = out["against"]["span-parallel+alora"]["all"]
    b = sum(mine[q, 0] and not plain[q, 0] for q in qs)
    c = sum(plain[q, 0] and not mine[q, 0] for q in qs)
    assert (t["b"], t["c"], t["n_pairs"]) == (b, c, 10) == (3, 2, 10)
    mine_items = LP.correct_by_item(tmp_path / "a", "span-parallel-reweight+alora")
    got = LP.compare("span-parallel-reweight+alora", mine_items, "stock", stock)
    assert got["all"]["n_pairs"] == 29  # every (question, position) both answered
    at2 = got["per_position"][2]
    assert at2["position"] == 2 and at2["n_pairs"] == 9
    assert at2["b"] == sum(mine[q, 2] and not stock[q, 2] for q in range(9))
    assert at2["accuracy"] == sum(stock[q, 2] for q in range(9)) / 9
