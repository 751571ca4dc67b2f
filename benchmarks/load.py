"""Load test against a running server: sweep concurrency, Medusa vs plain decoding, print a table, save a plot.

    python benchmarks/load.py --url http://127.0.0.1:8000 [--concurrency 1 2 4 8 16] [--requests-per-level 16]

Each level keeps `c` streaming chat requests in flight (greedy, max_tokens each with EOS ignored; tokens are counted
from `usage`) and measures aggregate tokens/s, p50/p99 request latency and p50 time to first token as the
client sees them. Both modes run at every level, side by side, so their ratio comes from one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe the water cycle.", "Write a poem about autumn.", "What makes a good friend?",
           "Explain photosynthesis to a child.", "Describe your ideal city.", "How do computers store numbers?"]


@dataclass(frozen=True)
class Sample:
    latency_s: float
    ttft_s: float
    tokens: int


@dataclass(frozen=True)
class Level:
    mode: str
    concurrency: int
    tokens_per_s: float
    p50_s: float
    p99_s: float
    ttft_p50_s: float
    mean_batch: float


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int, mode: str
                ) -> tuple[Sample, int]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "medusa": {"mode": mode, "ignore_eos": True}}
    start = time.perf_counter()
    ttft, tokens, batch = None, 0, 1
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if ttft is None and event["choices"]:
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event.get("medusa"):
                batch = event["medusa"]["batch_size"]
    return Sample(time.perf_counter() - start, ttft or 0.0, tokens), batch


def run_level(url: str, model: str, mode: str, concurrency: int, n: int, max_tokens: int) -> Level:
    with httpx.Client(timeout=600) as client, ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        jobs = [pool.submit(one_request, client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens, mode)
                for i in range(n)]
        results = [j.result() for j in jobs]
        wall = time.perf_counter() - start
    samples = [s for s, _ in results]
    lat = sorted(s.latency_s for s in samples)
    return Level(mode, concurrency, sum(s.tokens for s in samples) / wall, statistics.median(lat),
                 lat[min(len(lat) - 1, int(0.99 * len(lat)))], statistics.median(s.ttft_s for s in samples),
                 statistics.mean(b for _, b in results))


def print_table(levels: list[Level]) -> None:
    print("| mode | concurrency | tokens/s | vs c=1 | p50 latency s | p99 latency s | p50 TTFT s | mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    base = {lv.mode: lv.tokens_per_s for lv in levels if lv.concurrency == 1}
    for lv in levels:
        ratio = lv.tokens_per_s / base[lv.mode] if lv.mode in base else float("nan")
        print(f"| {lv.mode} | {lv.concurrency} | {lv.tokens_per_s:.1f} | {ratio:.2f}x | {lv.p50_s:.2f} | "
              f"{lv.p99_s:.2f} | {lv.ttft_p50_s:.2f} | {lv.mean_batch:.1f} |")
    for c in sorted({lv.concurrency for lv in levels}):
        pair = {lv.mode: lv.tokens_per_s for lv in levels if lv.concurrency == c}
        if {"medusa", "plain"} <= set(pair):
            print(f"c={c}: medusa/plain tokens/s = {pair['medusa'] / pair['plain']:.2f}x")


def plot(levels: list[Level], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in sorted({lv.mode for lv in levels}):
        rows = [lv for lv in levels if lv.mode == mode]
        a.plot([lv.concurrency for lv in rows], [lv.tokens_per_s for lv in rows], "o-", label=mode)
        b.plot([lv.concurrency for lv in rows], [lv.p50_s for lv in rows], "o-", label=f"{mode} p50")
        b.plot([lv.concurrency for lv in rows], [lv.p99_s for lv in rows], "x--", label=f"{mode} p99")
    a.set(xscale="log", xlabel="concurrent requests", ylabel="aggregate tokens/s", title="Throughput")
    b.set(xscale="log", xlabel="concurrent requests", ylabel="request latency (s)", title="Latency")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--requests-per-level", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=["medusa", "plain"], choices=["medusa", "plain"])
    p.add_argument("--plot", type=Path, default=Path("benchmarks/results/load.png"))
    args = p.parse_args()
    model = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    levels = []
    todo = [(c, m) for c in args.concurrency for m in args.modes]
    for c, mode in tqdm(todo, desc="levels"):
        levels.append(run_level(args.url, model, mode, c, max(args.requests_per_level, c), args.max_tokens))
    print_table(levels)
    plot(levels, args.plot)


if __name__ == "__main__":
    main()
