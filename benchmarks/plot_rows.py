"""Plots ``forward_rows_ms`` (from ``latest.json`` or a run file) as cost against the base
model over input rows, one line per configuration, into ``results/rows.png``; beside it, where
the results have them, ``forward_rows_gpu_ms`` (the GPU time with calls issued back to back,
from the same processes), which the host's jitter does not move.

    python -m benchmarks.plot_rows [RESULTS_JSON] [--out PNG]      (needs matplotlib)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.rows import ROWS

LABELS = {
    "lorahot": "lorahot",
    "lorahot_merged": "lorahot merged",
    "lorahot_extras": "lorahot, extras=True",
    "peft_bf16": "PEFT (bf16)",
    "peft": "PEFT",
    "lorahot_ungrouped": "lorahot, wide groups off",
}
COLORS = dict(
    zip(LABELS, ["C0", "C1", "C4", "C3", "C5", "C2"], strict=True)
)  # one colour per configuration in every panel


def ratios(data: dict) -> dict[str, list[tuple[int, float]]]:
    """config -> [(rows, ms / base ms)] over the row labels that have a base figure."""
    out: dict[str, list[tuple[int, float]]] = {}
    for label, (seqs, tokens) in ROWS.items():
        figures = data.get(label, {})
        base = figures.get("base")
        if not base:
            continue
        for config, ms in figures.items():
            if config != "base":
                out.setdefault(config, []).append((seqs * tokens, ms / base))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "rows.png")
    parser.add_argument("--note", default="", help="a second title line (e.g. which lorahot version ran)")
    args = parser.parse_args(argv)
    raw = json.loads(args.results.read_text())
    series = ratios(raw.get("forward_rows_ms", {}))
    if not series:
        raise SystemExit(f"{args.results}: no forward_rows_ms figures with a base; run --suite rows first.")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = ratios(raw.get("forward_rows_gpu_ms", {}))
    panels = [("synced call (forward_rows_ms)", series)] + (
        [("GPU, back to back (forward_rows_gpu_ms)", gpu)] if gpu else []
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (label, data) in zip(axes[0], panels, strict=True):
        for config, points in data.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=LABELS.get(config, config), color=COLORS.get(config))
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(1.1, color="grey", linewidth=0.8, linestyle="--", label="target 1.10x")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input rows (tokens in one forward)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("latency / base model latency")
    meta = raw.get("forward_rows_run", raw)  # latest.json names the run its forward_rows_ms come from
    title = f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, {meta.get('date', '')}, reduce-overhead"
    if "run_file" in meta:
        title += f": runs/{meta['run_file']}"
    fig.suptitle(title + (f"\n{args.note}" if args.note else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
