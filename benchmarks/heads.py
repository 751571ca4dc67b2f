"""Plot what `eval` and `tune-tree` measured for trained heads; print the tables again from the JSON files.

    python -m medusa_core eval --heads heads/smollm2-135m-instruct --json benchmarks/results/eval.json
    python -m medusa_core tune-tree --json benchmarks/results/tune.json
    python benchmarks/heads.py --eval benchmarks/results/eval.json --tune benchmarks/results/tune.json

Three panels: per-head top-1/top-5 held-out accuracy (the paper's Vicuna-7B heads for reference), the tree-size
curve (expected tokens/step, measured step cost, expected tokens/s; the chosen size marked), and measured tokens/s
per tree next to plain decoding, all from one run of each command. Saves benchmarks/results/heads.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PAPER_TOP1 = [0.56, 0.32, 0.20, 0.15]  # Medusa paper, Vicuna-7B heads
PAPER_TOP5 = [0.78, 0.56, 0.42, 0.34]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", required=True, help="JSON written by `python -m medusa_core eval --json`")
    parser.add_argument("--tune", required=True, help="JSON written by `python -m medusa_core tune-tree --json`")
    parser.add_argument("--out", default="benchmarks/results/heads.png")
    args = parser.parse_args()
    ev = json.loads(Path(args.eval).read_text())
    tune = json.loads(Path(args.tune).read_text())
    print_tables(ev, tune)
    plot(ev, tune, Path(args.out))


def print_tables(ev: dict, tune: dict) -> None:
    print(f"{'head':>4}{'top1':>7}{'top5':>7}{'paper top1':>12}{'paper top5':>12}")
    for i, a in enumerate(ev["accuracy"]["self"]):
        p1 = f"{PAPER_TOP1[i]:.2f}" if i < len(PAPER_TOP1) else "-"
        p5 = f"{PAPER_TOP5[i]:.2f}" if i < len(PAPER_TOP5) else "-"
        print(f"{a['head']:>4}{a['top1']:>7.3f}{a['top5']:>7.3f}{p1:>12}{p5:>12}")
    base = ev["runs"][0]["tokens_per_second"]
    print(f"\n{'tree':<14}{'nodes':>6}{'tok/step':>10}{'tok/s':>8}{'speed-up':>10}  same-as-plain")
    for r in ev["runs"]:
        print(f"{r['name']:<14}{r['nodes']:>6}{r['accepted_length']:>10.2f}{r['tokens_per_second']:>8.1f}"
              f"{r['tokens_per_second'] / base:>9.2f}x  {'yes' if r['matches_plain'] else 'NO'}")
    print(f"\ntune-tree: best {tune['best_nodes']} nodes")


def plot(ev: dict, tune: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.5))
    acc = ev["accuracy"]["self"]
    heads = [a["head"] for a in acc]
    w = 0.2
    a1.bar([h - 1.5 * w for h in heads], [a["top1"] for a in acc], w, label="top-1 (ours)")
    a1.bar([h - 0.5 * w for h in heads], [a["top5"] for a in acc], w, label="top-5 (ours)")
    n = min(len(heads), len(PAPER_TOP1))
    a1.bar([h + 0.5 * w for h in heads[:n]], PAPER_TOP1[:n], w, label="top-1 (paper, Vicuna-7B)", alpha=0.5)
    a1.bar([h + 1.5 * w for h in heads[:n]], PAPER_TOP5[:n], w, label="top-5 (paper, Vicuna-7B)", alpha=0.5)
    a1.set(xlabel="head", ylabel="held-out accuracy vs base argmax", title="Per-head accuracy", ylim=(0, 1))
    a1.legend(fontsize=8)
    curve = tune["curve"]
    nodes = [c["nodes"] for c in curve]
    a2.plot(nodes, [c["tokens_per_second"] for c in curve], label="expected tokens/s")
    a2.axvline(tune["best_nodes"], color="gray", linestyle=":", label=f"chosen: {tune['best_nodes']} nodes")
    a2b = a2.twinx()
    a2b.plot(nodes, [1000 * c["step_s"] for c in curve], color="tab:red", label="step cost (ms)")
    a2b.set_ylabel("ms per step", color="tab:red")
    a2.set(xlabel="tree nodes", ylabel="expected tokens/s", title="Tree size: expected speed vs measured cost")
    a2.legend(loc="lower right", fontsize=8)
    runs = ev["runs"]
    a3.bar(range(len(runs)), [r["tokens_per_second"] for r in runs],
           color=["gray"] + ["tab:orange" if r["name"].endswith("+lookup") else "tab:blue" for r in runs[1:]])
    for i, r in enumerate(runs):  # two short lines, rotated, so that a dozen bars stay readable
        a3.text(i, r["tokens_per_second"], f" {r['tokens_per_second'] / runs[0]['tokens_per_second']:.2f}x, "
                f"{r['accepted_length']:.2f}/step", ha="center", va="bottom", fontsize=7, rotation=90)
    a3.set_xticks(range(len(runs)), [f"{r['name']} ({r['nodes']})" for r in runs], fontsize=8, rotation=30, ha="right")
    a3.set(ylabel="tokens/s (decode, batch 1)", title="Measured: Medusa trees vs plain greedy (orange: +lookup)",
           ylim=(0, 1.55 * max(r["tokens_per_second"] for r in runs)))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
