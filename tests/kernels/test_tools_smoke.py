"""CPU smoke tests of the autotuner and the kernel benchmark (interpret mode, tiny shapes)."""

import json

from spanjax.kernels.span_attention import tune, tuning


def test_tune_quick_writes_table(tmp_path):
    out = tmp_path / "table.json"
    tune.main(["--quick", "--bucket", "mixed:2:8:48", "--out", str(out)])
    table = json.loads(out.read_text())
    assert table["format"] == tuning.TABLE_FORMAT
    (entries,) = table["entries"].values()
    (entry,) = entries.values()
    assert {"block_q", "pages_per_block", "num_splits", "us"} <= set(entry)


def test_kernel_bench_tiny(tmp_path):
    from spanjax.eval import kernel_bench

    meta = kernel_bench.main(["--tiny", "--case", "decode:2:40", "--reps", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"][0]["case"] == "decode:2:40"
    impls = meta["results"][0]["impls"]
    assert impls["pallas"]["max_abs_diff"] <= 1e-5
    assert "reference" in impls
