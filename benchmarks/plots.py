"""PNG plots of the peer benchmarks' JSON results (benchmarks/results/), written beside them:
- latency-roofline.png: batch-1 decode tokens/s per engine and weight format against the read-bandwidth roofline
  (read bandwidth / weight bytes per token) measured in the same run;
- serving-throughput-<dataset>.png: output tokens/s against concurrency, one line per engine;
- serving-latency-<dataset>.png: TTFT and TPOT distributions per engine at one concurrency (default 16).

    python -m benchmarks.plots [--concurrency 16]     (make bench-plots)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.report import RESULTS


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def subtitle(result: dict) -> str:
    machine = result["machine"]
    return (f"{Path(result['checkpoint']).name}, {machine['cpu']} x{machine['cores']}, "
            f"read {machine['read_gb_s']:.0f} GB/s, {result['date']}")


def latency_roofline(result: dict) -> Path:
    rows = result["rows"]
    read_gb_s = result["machine"]["read_gb_s"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    names = [r["engine"] for r in rows]
    measured = [r["decode_tok_s"] for r in rows]
    roofline = [read_gb_s / r["weight_gb"] for r in rows]
    colours = ["tab:blue" if n.startswith("MILI") else "tab:gray" for n in names]
    ax.bar(names, measured, color=colours, label="measured decode tok/s")
    ax.scatter(names, roofline, marker="_", s=900, color="tab:red", label="roofline: read bw / weight bytes")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['decode_tok_s']:.1f}\n{r['roofline_share']:.0%}", (i, r["decode_tok_s"]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("batch-1 decode tokens/s")
    ax.set_title(f"Decode speed against the bandwidth roofline\n{subtitle(result)}", fontsize=10)
    ax.tick_params(axis="x", rotation=30)
    ax.set_ylim(top=max(roofline + measured) * 1.3)  # room for the legend above every bar and marker
    ax.legend(fontsize=8, loc="upper left", markerscale=0.3)
    fig.tight_layout()
    path = RESULTS / "latency-roofline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def serving_throughput(result: dict, dataset: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in result["rows"] if r["dataset"] == dataset and r["load"] == "concurrency"]
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == engine]
        # A point where every request failed has no throughput: marked apart, not drawn as 0 tokens/s.
        points = sorted((r["value"], r["output_tok_s"]) for r in mine if r["failed"] < r["requests"])
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=engine,
                        linewidth=2.5 if engine.startswith("MILI") else 1.5)
        for r in mine:
            if r["failed"] == r["requests"]:
                ax.scatter([r["value"]], [0], marker="x", s=80, color=line.get_color())
                ax.annotate(f"{engine}: all {r['requests']} failed", (r["value"], 0), textcoords="offset points",
                            xytext=(-8, 8), ha="right", fontsize=8, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Serving throughput, {dataset} dataset\n{subtitle(result)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"serving-throughput-{dataset}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def serving_latency(result: dict, dataset: str, concurrency: int) -> Path | None:
    rows = [r for r in result["rows"] if r["dataset"] == dataset and r["load"] == "concurrency"
            and r["value"] == concurrency and r["ttft_samples_ms"]]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, metric, label in ((axes[0], "ttft_samples_ms", "TTFT ms"), (axes[1], "tpot_samples_ms", "TPOT ms")):
        ax.boxplot([r[metric] for r in rows], tick_labels=[r["engine"] for r in rows], showfliers=True)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Latency distributions at concurrency {concurrency}, {dataset} dataset\n{subtitle(result)}",
                 fontsize=10)
    fig.tight_layout()
    path = RESULTS / f"serving-latency-{dataset}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16, help="the serving point whose distributions to plot")
    parser.add_argument("--latency", default="latency", help="latency results to plot: results/NAME.json")
    parser.add_argument("--serving", default="serving", help="serving results to plot: results/NAME.json")
    args = parser.parse_args(argv)
    written = []
    if latency := load(args.latency):
        written.append(latency_roofline(latency))
    if serving := load(args.serving):
        for dataset in dict.fromkeys(r["dataset"] for r in serving["rows"]):
            written.append(serving_throughput(serving, dataset))
            written.append(serving_latency(serving, dataset, args.concurrency))
    written = [p for p in written if p is not None]
    if not written:
        print(f"nothing to plot: run the benchmarks first (no {args.latency}.json or {args.serving}.json in "
              f"{RESULTS})")
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
