"""Peer benchmark: our served app vs llama-cpp-python's own OpenAI server, side by side, over HTTP.

    python benchmarks/peer.py [--url http://127.0.0.1:8000 | --start-ours] [--concurrency 1 4 8]
        [--requests-per-level 16] [--max-tokens 128] [--rounds 1]

The peer is `python -m llama_cpp.server --model <the shipped Q4_1 GGUF>` (llama-cpp-python at the version
pyproject.toml pins, installed on demand into its own virtualenv, <cache root>/peer-venv, never a project dependency),
with its default settings except host, port, `--n_ctx` (our requests' context, 2048) and `--interrupt_requests
False` (see --peer-interrupt-requests). Both servers get identical streaming chat requests through the `openai`
client: the same prompts (benchmarks/load.py's), temperature 0, max_tokens; no extension fields. At each
concurrency level `c`, `--requests-per-level` requests run with `c` in flight at once, on both servers back to back
(the order alternates from level to level), after 2 warm-up requests per server. Per server and level: aggregate
completion tokens/s (the final `usage` chunk where the server sends one, else one token per content chunk),
p50/p99 request latency, p50 time to first content token, and the ratio ours / llama_cpp.server. Prints a
markdown table; writes benchmarks/results/peer.json and benchmarks/results/peer.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.load import PROMPTS  # noqa: E402  (the repo's chat prompts: one list for every benchmark)
from benchmarks.servers import (Server, answers, ensure_peer_venv, free_port, pinned_llama_cpp_version,  # noqa: E402
                                shipped_gguf, start, stop, wait_ready)
from medusa_core.config import cache_root  # noqa: E402

OURS, PEER = "ours", "llama_cpp.server"


@dataclass
class Sample:
    latency_s: float = math.nan
    ttft_s: float = math.nan
    tokens: int = 0
    counted_from: str = "chunks"  # "usage" when the server sent a final usage chunk
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Level:
    server: str
    concurrency: int
    requests: int
    wall_s: float
    tokens_per_s: float
    p50_s: float
    p99_s: float
    ttft_p50_s: float
    completion_tokens: int
    tokens_per_request: float
    counted_from: str
    errors: int
    unfinished: int  # streams that ended without a finish_reason (cut short)
    order: int  # 0: ran first at this level, 1: second
    round: int
    finish_reasons: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None


# --- load -----------------------------------------------------------------------------------------------------

def one_request(client: OpenAI, model: str, prompt: str, max_tokens: int) -> Sample:
    s, chunks, usage_tokens = Sample(), 0, None
    start_t = time.perf_counter()
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if getattr(chunk, "usage", None) is not None:
                usage_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices or []:
                if choice.delta is not None and choice.delta.content:
                    if chunks == 0:
                        s.ttft_s = time.perf_counter() - start_t
                    chunks += 1
                if choice.finish_reason:
                    s.finish_reason = choice.finish_reason
        s.latency_s = time.perf_counter() - start_t
    except Exception as e:  # noqa: BLE001 - one failed request is a counted result, not the end of the run
        s.error = f"{type(e).__name__}: {e}"[:300]
        return s
    s.tokens, s.counted_from = (usage_tokens, "usage") if usage_tokens is not None else (chunks, "chunks")
    return s


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else math.nan


def run_level(server: Server, client: OpenAI, concurrency: int, n: int, max_tokens: int, order: int,
              rnd: int) -> Level:
    with ThreadPoolExecutor(concurrency) as pool:
        start_t = time.perf_counter()
        jobs = [pool.submit(one_request, client, server.model, PROMPTS[i % len(PROMPTS)], max_tokens)
                for i in range(n)]
        samples = [j.result() for j in jobs]
        wall = time.perf_counter() - start_t
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in ok)
    finish: dict[str, int] = {}
    for s in ok:
        finish[str(s.finish_reason)] = finish.get(str(s.finish_reason), 0) + 1
    errors = [s.error for s in samples if s.error is not None]
    return Level(server.name, concurrency, n, wall, tokens / wall, pct([s.latency_s for s in ok], 0.5),
                 pct([s.latency_s for s in ok], 0.99), pct([s.ttft_s for s in ok if not math.isnan(s.ttft_s)], 0.5),
                 tokens, tokens / len(ok) if ok else math.nan,
                 "/".join(sorted({s.counted_from for s in ok})) or "-", len(errors),
                 sum(s.finish_reason is None for s in ok), order, rnd, finish, errors[0] if errors else None)


def merge(levels: list[Level]) -> Level:
    """Several rounds of one (server, concurrency) as one level: tokens/s over the summed wall time; p50, p99 and
    TTFT the median of the rounds' values."""
    if len(levels) == 1:
        return levels[0]
    a, wall, tokens = levels[0], sum(lv.wall_s for lv in levels), sum(lv.completion_tokens for lv in levels)
    ok = sum(lv.requests - lv.errors for lv in levels)
    finish: dict[str, int] = {}
    for lv in levels:
        for k, v in lv.finish_reasons.items():
            finish[k] = finish.get(k, 0) + v
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return Level(a.server, a.concurrency, sum(lv.requests for lv in levels), wall, tokens / wall,
                 med([lv.p50_s for lv in levels]), med([lv.p99_s for lv in levels]),
                 med([lv.ttft_p50_s for lv in levels]), tokens, tokens / ok if ok else math.nan, a.counted_from,
                 sum(lv.errors for lv in levels), sum(lv.unfinished for lv in levels), -1, -1, finish,
                 next((lv.first_error for lv in levels if lv.first_error), None))


# --- report ---------------------------------------------------------------------------------------------------

def ratio(a: float, b: float) -> float:
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def ratios(levels: list[Level]) -> list[dict]:
    out = []
    for c in sorted({lv.concurrency for lv in levels}):
        pair = {lv.server: lv for lv in levels if lv.concurrency == c}
        if {OURS, PEER} <= set(pair):
            o, p = pair[OURS], pair[PEER]
            out.append({"concurrency": c, "tokens_per_s": ratio(o.tokens_per_s, p.tokens_per_s),
                        "p50_latency": ratio(o.p50_s, p.p50_s), "p99_latency": ratio(o.p99_s, p.p99_s),
                        "ttft_p50": ratio(o.ttft_p50_s, p.ttft_p50_s)})
    return out


def table(levels: list[Level]) -> str:
    f = lambda x, spec: "n/a" if x is None or math.isnan(x) else format(x, spec)  # noqa: E731
    lines = ["| concurrency | server | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | tokens/request | "
             "requests (errors, unfinished) |", "|---|---|---|---|---|---|---|---|"]
    rs = {r["concurrency"]: r for r in ratios(levels)}
    for c in sorted({lv.concurrency for lv in levels}):
        for lv in sorted((lv for lv in levels if lv.concurrency == c), key=lambda lv: lv.server != OURS):
            lines.append(f"| {c} | {lv.server} | {f(lv.tokens_per_s, '.1f')} | {f(lv.p50_s, '.2f')} | "
                         f"{f(lv.p99_s, '.2f')} | {f(lv.ttft_p50_s, '.3f')} | {f(lv.tokens_per_request, '.1f')} | "
                         f"{lv.requests} ({lv.errors}, {lv.unfinished}) |")
        if c in rs:
            r = rs[c]
            lines.append(f"| {c} | **ours / llama_cpp.server** | **{f(r['tokens_per_s'], '.2f')}x** | "
                         f"{f(r['p50_latency'], '.2f')}x | {f(r['p99_latency'], '.2f')}x | "
                         f"{f(r['ttft_p50'], '.2f')}x | | |")
    return "\n".join(lines)


def plot(levels: list[Level], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    cs = sorted({lv.concurrency for lv in levels})
    for name, style in ((OURS, "o-"), (PEER, "s-")):
        rows = sorted((lv for lv in levels if lv.server == name), key=lambda lv: lv.concurrency)
        x = [lv.concurrency for lv in rows]
        a.plot(x, [lv.tokens_per_s for lv in rows], style, label=name)
        b.plot(x, [lv.p50_s for lv in rows], style, label=f"{name} p50 latency")
        b.plot(x, [lv.ttft_p50_s for lv in rows], style.replace("-", "--"), alpha=0.6, label=f"{name} p50 TTFT")
    for ax in (a, b):
        if len(cs) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a.set(xlabel="concurrent requests", ylabel="aggregate completion tokens/s", title="Throughput")
    b.set(xlabel="concurrent requests", ylabel="seconds", title="Latency")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def clean(x):
    """JSON without NaN (null instead)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x


def git_head() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


# --- main -----------------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="our app (already running unless --start-ours)")
    p.add_argument("--start-ours", action="store_true", help="run `bash .ci/serve` (serves on --url's default, "
                   "http://127.0.0.1:8000), wait for /v1/models, stop it with SIGINT at the end")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests-per-level", type=int, default=16, help="at least the level's concurrency")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep, interleaved; tokens/s over the "
                   "summed time, latencies the median over rounds")
    p.add_argument("--config", type=Path, default=ROOT / "configs/smollm2-135m-llamacpp.yaml",
                   help="model config whose base_model.gguf_file the peer serves")
    p.add_argument("--peer-venv", type=Path, default=cache_root() / "peer-venv")
    p.add_argument("--peer-port", type=int, default=0, help="0: a free port")
    p.add_argument("--peer-n-ctx", type=int, default=2048, help="context per request, as our config's "
                   "base_model.context_length")
    p.add_argument("--peer-interrupt-requests", choices=["true", "false"], default="false",
                   help="llama_cpp.server's own default is true: a stream is cut off (an early [DONE], no "
                   "finish_reason) as soon as another request waits for the model, so at concurrency > 1 nearly "
                   "every request would return a few tokens; false lets each request finish, in arrival order")
    p.add_argument("--peer-extra-args", default="", help="more llama_cpp.server flags, recorded with the command "
                   "(e.g. '--n_threads_batch 1': its default prompt threads = all CPUs, which contend with Ray's "
                   "processes on a 2-core machine)")
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for a server to answer")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused"))
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/peer.json")
    p.add_argument("--plot", type=Path, default=ROOT / "benchmarks/results/peer.png")
    p.add_argument("--setup-only", action="store_true", help="install the peer's virtualenv and exit")
    args = p.parse_args()
    t0 = time.monotonic()

    version = pinned_llama_cpp_version()
    peer_python = ensure_peer_venv(args.peer_venv.resolve(), version)
    if args.setup_only:
        return
    gguf = shipped_gguf(args.config)
    port = args.peer_port or free_port()
    peer = Server(PEER, f"http://127.0.0.1:{port}",
                  [str(peer_python), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                   "--port", str(port), "--n_ctx", str(args.peer_n_ctx),
                   "--interrupt_requests", args.peer_interrupt_requests.capitalize(),
                   *shlex.split(args.peer_extra_args)])
    ours = Server(OURS, args.url.rstrip("/"), ["bash", ".ci/serve"] if args.start_ours else None)

    started: list[tuple[Server, int, float]] = []
    levels: list[Level] = []
    try:
        if ours.command is not None:
            if answers(ours.url) is not None:
                raise SystemExit(f"something already serves {ours.url}: stop it, or drop --start-ours to "
                                 f"benchmark it")
            start(ours)
            started.append((ours, signal.SIGINT, 120))
        wait_ready(ours, args.startup_timeout if ours.command else 10)  # first: .ci/serve may time trees on start
        if answers(peer.url) is not None:
            raise SystemExit(f"port {port} is taken: pass another --peer-port")
        start(peer)
        started.append((peer, signal.SIGINT, 30))
        wait_ready(peer, args.startup_timeout)

        clients = {s.name: OpenAI(base_url=f"{s.url}/v1", api_key=args.api_key, timeout=600, max_retries=0)
                   for s in (ours, peer)}
        for s in (ours, peer):
            warm = [one_request(clients[s.name], s.model, PROMPTS[i], args.max_tokens) for i in range(2)]
            bad = [w.error for w in warm if w.error]
            if bad:
                raise SystemExit(f"{s.name} failed its warm-up requests: {bad[0]}")
            print(f"{s.name} warmed up (2 requests, {sum(w.tokens for w in warm)} tokens)", flush=True)

        k = 0
        for rnd in range(args.rounds):
            for c in args.concurrency:
                pair = (ours, peer) if k % 2 == 0 else (peer, ours)  # alternate who goes first
                k += 1
                for order, s in enumerate(pair):
                    lv = run_level(s, clients[s.name], c, max(args.requests_per_level, c), args.max_tokens, order,
                                   rnd)
                    levels.append(lv)
                    err = f", first error: {lv.first_error}" if lv.first_error else ""
                    print(f"[{time.monotonic() - t0:5.0f} s] round {rnd + 1} c={c} {s.name:16s} "
                          f"{lv.tokens_per_s:7.1f} tokens/s  p50 {lv.p50_s:.2f} s  p99 {lv.p99_s:.2f} s  "
                          f"TTFT p50 {lv.ttft_p50_s:.3f} s  {lv.completion_tokens} tokens / {lv.requests} requests "
                          f"({lv.errors} errors, {lv.unfinished} unfinished){err}", flush=True)
    finally:
        for s, sig, wait_s in reversed(started):
            stop(s, sig, wait_s)

    merged = [merge([lv for lv in levels if (lv.server, lv.concurrency) == key])
              for key in dict.fromkeys((lv.server, lv.concurrency) for lv in levels)]
    title = (f"{gguf.name} ({PEER} {version}) vs {ours.model} ({ours.url}); {len(PROMPTS)} prompts, max_tokens "
             f"{args.max_tokens}, {args.requests_per_level} requests/level, {os.cpu_count()} CPUs")
    print()
    print(title)
    print(table(merged))
    result = {
        "title": title,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "commit": git_head(),
        "settings": {"concurrency": args.concurrency, "requests_per_level": args.requests_per_level,
                     "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "rounds": args.rounds,
                     "prompts": PROMPTS, "warmup_requests": 2},
        "ours": {"url": ours.url, "model": ours.model,
                 "command": shlex.join(ours.command) if ours.command else None},
        "peer": {"url": peer.url, "model": peer.model, "command": shlex.join(peer.command),
                 "llama_cpp_python": version, "gguf": str(gguf),
                 "notes": "llama_cpp.server defaults otherwise (n_threads = cpus // 2, n_threads_batch = cpus, "
                          "n_batch 512, chat format from "
                          "the GGUF; its request defaults apply too: repeat_penalty 1.1, top_k 40, min_p 0.05); "
                          "it streams no usage chunk, so its tokens are counted as content chunks"},
        "levels": [asdict(lv) for lv in merged],
        "runs": [asdict(lv) for lv in levels],
        "ratios_ours_over_peer": ratios(merged),
        "elapsed_s": time.monotonic() - t0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(clean(result), indent=2) + "\n")
    plot(merged, args.plot, title)
    print(f"\npeer command: {shlex.join(peer.command)}")
    print(f"results: {args.json}, plot: {args.plot} ({time.monotonic() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
