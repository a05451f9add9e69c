"""Shared reporting for the TTFT experiments (eval/rag_ttft.py, eval/nested_ttft.py):
items keyed (variant, x, trial) with variant "span" or "stock" -> per-x medians and the
stock/span ratio, a markdown table and a log-x plot of both curves."""

from __future__ import annotations

import statistics

from spanjax.runs import write_results

VARIANTS = ("span", "stock")


def _median(recs: list[dict], field: str):
    return statistics.median(r[field] for r in recs) if recs else None


def summarize(xs, done: dict, x_name: str) -> list[dict]:
    """One row per x: medians over the finished trials of each variant, and the ratio."""
    rows = []
    for x in xs:
        row = {x_name: x}
        for v in VARIANTS:
            recs = [r for k, r in done.items() if k[0] == v and k[1] == x]
            row[v] = {
                "trials": len(recs),
                "ttft_median_s": _median(recs, "ttft_s"),
                "wall_median_s": _median(recs, "wall_s"),
                "prompt_tokens": _median(recs, "prompt_tokens"),
                "cached_tokens": _median(recs, "cached_tokens"),
            }
        s, t = row["span"]["ttft_median_s"], row["stock"]["ttft_median_s"]
        row["ttft_ratio_stock_over_span"] = t / s if s and t else None
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], x_name: str) -> str:
    lines = [
        f"| {x_name} | span TTFT ms | stock TTFT ms | stock/span | span cached/prompt | stock cached/prompt |",
        "|---|---|---|---|---|---|",
    ]
    ms = lambda x: f"{x * 1000:.0f}"
    for r in rows:
        ratio, s, t = r["ttft_ratio_stock_over_span"], r["span"], r["stock"]
        if ratio is None:
            lines.append(f"| {r[x_name]} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r[x_name]} | {ms(s['ttft_median_s'])} | {ms(t['ttft_median_s'])} | {ratio:.2f}x | "
            f"{s['cached_tokens']:.0f}/{s['prompt_tokens']:.0f} | {t['cached_tokens']:.0f}/{t['prompt_tokens']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], x_name: str, xlabel: str, title: str, path) -> None:
    """Median TTFT of both variants against x (log-log), the ratio annotated at each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ttft_ratio_stock_over_span"]]
    if not rows:
        return
    xs = [r[x_name] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in VARIANTS:
        ax.plot(xs, [r[v]["ttft_median_s"] * 1000 for r in rows], marker="o", label=v)
    for r in rows:
        ax.annotate(
            f"{r['ttft_ratio_stock_over_span']:.1f}x",
            (r[x_name], r["stock"]["ttft_median_s"] * 1000),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("TTFT, median (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dir, results: dict, rows: list[dict], x_name: str, xlabel: str, title: str) -> dict:
    """results.json (with the rows and their table), summary.md and ttft.png; returns the results."""
    md = markdown_table(rows, x_name)
    results = {**results, "rows": rows, "table_markdown": md}
    write_results(run_dir, results)
    (run_dir.path / "summary.md").write_text(md + "\n")
    plot(rows, x_name, xlabel, title, run_dir.path / "ttft.png")
    return results
