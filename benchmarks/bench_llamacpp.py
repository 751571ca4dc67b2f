"""Medusa on llama.cpp vs plain decoding vs llama-cpp-python's own greedy `create_completion`, side by side.

    python benchmarks/bench_llamacpp.py [--config configs/smollm2-135m-llamacpp.yaml] [--gguf FILE]
        [--trees chain_1 chain_2 chain_3] [--lookup] [--adaptive mc_16] [--batch-sizes 1 4 8] [--max-tokens 128]
        [--prompts 8]

One run, the same chat prompts and token budget for every row, greedy, EOS ignored. It prints:
- the cost curve: ms per step (verify + keep) of a chain of N nodes after a 200-token prefix;
- tokens/s per decoder: llama-cpp-python `Llama.create_completion` (temperature 0) and, when given
  `--prompt-lookup`, its `LlamaPromptLookupDecoding`; plain and Medusa (one row per tree) through our backend,
  at every batch size (and with `--adaptive`, the adaptive tree); with the Medusa/plain ratio, tokens per step,
  the share of time spent in the heads, and whether Medusa's tokens equal plain's (they must);
and saves a bar plot next to the table (benchmarks/results/llamacpp.png by default).
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from medusa_core.adaptive import calibrate, shipped_prior
from medusa_core.backends.hf import resolve_source
from medusa_core.config import LookupConfig, load_config, resolve_repo_path
from medusa_core.tools.evaluate import top2_gap
from medusa_core.generator import MedusaGenerator, load_generator, shipped_accuracy
from medusa_core.request import Request
from medusa_core.lookup import LookupDrafter
from medusa_core.tree import build_tree_buffers
from medusa_core.tree_presets import preset_paths
from medusa_core.timing import fastest_in_turns

from cost_curve import ours  # benchmarks/cost_curve.py: our step, the context restored after it
from load import PROMPTS  # benchmarks/load.py: one list of chat prompts for every benchmark


@dataclass(frozen=True)
class Row:
    decoder: str
    batch: int
    tokens_per_s: float
    tokens_per_step: float | None = None
    heads_share: float | None = None
    python_share: float | None = None  # everything but the heads and llama_decode
    same_as_plain: str = ""


class OracleDrafter:
    """Heads that know plain decoding's output: the acceptance upper bound, to show what verification costs allow."""

    def __init__(self, references: dict[tuple[int, ...], tuple[int, ...]], num_heads: int) -> None:
        self.references, self.num_heads = references, num_heads

    def draft(self, hidden, roots, history: list[list[int]], depth: int, top_k: int, backend) -> torch.Tensor:
        out = torch.zeros(len(history), self.num_heads, top_k, dtype=torch.long)
        for b, h in enumerate(history):
            prompt = next(p for p in self.references if tuple(h[: len(p)]) == p)
            truth, done = self.references[prompt], len(h) - len(prompt)
            for k in range(self.num_heads):
                out[b, k, 0] = truth[done + k] if done + k < len(truth) else 0
        return out


class TimedDrafter:
    """Wraps the heads to count the seconds spent drafting."""

    def __init__(self, drafter) -> None:
        self.drafter, self.seconds, self.num_heads = drafter, 0.0, drafter.num_heads

    def draft(self, *args):
        start = time.perf_counter()
        out = self.drafter.draft(*args)
        self.seconds += time.perf_counter() - start
        return out


def run_ours(gen: MedusaGenerator, prompts: list[tuple[int, ...]], batch: int, mode: str, n: int
             ) -> tuple[float, float, list[tuple[int, ...]]]:
    """-> (tokens/s, tokens per step, token ids per prompt), prompts in groups of `batch`."""
    tokens, steps, ids, start = 0, 0, [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        reqs = [Request(prompt_ids=p, max_tokens=n, mode=mode, ignore_eos=True) for p in prompts[i : i + batch]]
        for r in gen.generate(reqs):
            tokens += r.stats.generated_tokens
            steps += r.stats.decode_steps + 1
            ids.append(r.token_ids)
    return tokens / (time.perf_counter() - start), tokens / steps, ids


def medusa_row(gen: MedusaGenerator, drafter, label: str, prompts: list[tuple[int, ...]], batch: int, n: int,
               plain_ids: list[tuple[int, ...]]) -> Row:
    """Decode with `drafter` and the generator's tree (and policy): tokens/s, tokens per step, the heads' share of
    the time, and how many outputs equal plain decoding's."""
    gen.drafter, decode_s, start = TimedDrafter(drafter), gen.backend.decode_s, time.perf_counter()
    tps, per_step, ids = run_ours(gen, prompts, batch, "medusa", n)
    wall = time.perf_counter() - start
    share, decode_share = gen.drafter.seconds / wall, (gen.backend.decode_s - decode_s) / wall
    gaps = [parting_gap(gen, p, a, b) for p, a, b in zip(prompts, ids, plain_ids) if a != b]
    parted = f" (parted at top-2 logit gaps {', '.join(f'{g:.1e}' for g in gaps)})" if gaps else ""
    return Row(label, batch, tps, per_step, share, python_share=1 - share - decode_share,
               same_as_plain=f"{len(ids) - len(gaps)}/{len(ids)}{parted}")


def parting_gap(gen: MedusaGenerator, prompt: tuple[int, ...], got: tuple[int, ...], ref: tuple[int, ...]) -> float:
    """Plain decoding's top-2 logit gap (`top2_gap`) where the two outputs part."""
    i = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    return top2_gap(gen.backend, list(prompt) + list(ref[:i]))


def run_llama_cpp_python(gguf: Path, prompts: list[tuple[int, ...]], n: int, threads: int, n_ctx: int,
                         lookup: bool) -> float:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=4) if lookup else None
    llm = Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, draft_model=draft)
    llm.create_completion(list(prompts[0]), max_tokens=4, temperature=0.0)  # warm-up
    tokens, start = 0, time.perf_counter()
    for p in prompts:
        llm.reset()  # no prefix reuse between prompts, as for our backend
        out = llm.create_completion(list(p), max_tokens=n, temperature=0.0, top_k=1, logit_bias={})
        tokens += out["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - start)


def cost_curve(gen: MedusaGenerator, sizes: list[int], prefix: int = 200, repeats: int = 5) -> dict[int, float]:
    """ms for one step (verify + keep, cost_curve.ours) of a chain of N nodes after a `prefix`-token prompt, best of
    `repeats` after a warm-up."""
    _, cache = gen.backend.prefill([list(range(1000, 1000 + prefix))])
    steps = [partial(ours, gen.backend, cache, 1, n) for n in sizes]
    return {n: 1000 * t for n, t in zip(sizes, fastest_in_turns(steps, repeats))}


def table(rows: list[Row], plain: dict[int, float], peer: float) -> str:
    lines = ["| decoder | batch | tokens/s | vs plain (same batch) | vs create_completion (shipped file) | "
             "tokens/step | heads share | other Python share | output == plain |", "|---" * 9 + "|"]
    for r in rows:
        fmt = lambda x, f: "" if x is None else f.format(x)  # noqa: E731
        lines.append(f"| {r.decoder} | {r.batch} | {r.tokens_per_s:.1f} | "
                     f"{fmt(r.tokens_per_s / plain[r.batch] if r.batch in plain else None, '{:.2f}x')} | "
                     f"{r.tokens_per_s / peer:.2f}x | {fmt(r.tokens_per_step, '{:.2f}')} | "
                     f"{fmt(r.heads_share, '{:.0%}')} | {fmt(r.python_share, '{:.0%}')} | {r.same_as_plain} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
    labels = [f"{r.decoder}\nB={r.batch}" for r in rows]
    colors = ["tab:gray" if "llama-cpp" in r.decoder else "tab:blue" if r.decoder == "plain" else "tab:orange"
              for r in rows]
    ax.bar(range(len(rows)), [r.tokens_per_s for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("tokens/s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2-135m-llamacpp.yaml")
    ap.add_argument("--gguf", default=None, help="another GGUF file of the same model (e.g. an F16 or Q8_0 copy)")
    ap.add_argument("--trees", nargs="+", default=["chain_1", "chain_2", "chain_3"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-lookup", action="store_true", help="also run LlamaPromptLookupDecoding")
    ap.add_argument("--lookup", action="store_true", help="also run every tree with our prompt lookup merged into "
                    "the heads' candidates (the config's tree.lookup settings)")
    ap.add_argument("--threads", type=int, default=None, help="override base_model.llamacpp.n_threads")
    ap.add_argument("--head-vocab", type=int, default=None, help="override heads.head_vocab")
    ap.add_argument("--oracle", action="store_true", help="heads that know plain's output (acceptance upper bound)")
    ap.add_argument("--adaptive", default=None, metavar="TREE",
                    help="also run the adaptive tree over this preset's prefixes (timed on startup, learns online)")
    ap.add_argument("--plot", default="benchmarks/results/llamacpp.png")
    args = ap.parse_args()

    config = load_config(args.config)
    base = config.base_model
    shipped = Path(resolve_source(base.source)) / base.gguf_file  # the peer runs on the config's own file
    if args.gguf is not None:  # that file as it is: no re-encoding
        gguf = Path(args.gguf).resolve()
        source = base.source.model_copy(update={"package": None, "path": str(gguf.parent)})
        settings = base.llamacpp.model_copy(update={"requantize": None})
        base = base.model_copy(update={"source": source, "gguf_file": gguf.name, "llamacpp": settings})
    if args.threads is not None:
        base = base.model_copy(update={"llamacpp": base.llamacpp.model_copy(update={"n_threads": args.threads})})
    heads_cfg = config.heads
    if args.head_vocab is not None:
        heads_cfg = heads_cfg.model_copy(update={"head_vocab": args.head_vocab})
    config = config.model_copy(update={"base_model": base, "heads": heads_cfg})
    gen = load_generator(config)
    gen.policy = None  # fixed-tree rows use their tree every step; the adaptive row sets its own policy
    heads = gen.drafter.heads if isinstance(gen.drafter, LookupDrafter) else gen.drafter  # rows say which they use
    lookup = config.tree.lookup or LookupConfig()
    gguf_path = gen.backend.gguf_path
    prompts = [tuple(gen.encode_chat([{"role": "user", "content": p}])) for p in (PROMPTS * 4)[: args.prompts]]
    n, threads = args.max_tokens, base.llamacpp.n_threads or 2

    policy = None
    if args.adaptive is not None:
        policy = calibrate(gen.backend, heads, preset_paths(args.adaptive), config.tree.top_k, max(args.batch_sizes))
        policy.prior = shipped_prior(shipped_accuracy(config.heads), preset_paths(args.adaptive))
    curve = cost_curve(gen, [1, 2, 4, 8, 16, 32, 64])
    print("ms per step (verify + keep) of a chain of N nodes (200-token prefix): "
          + ", ".join(f"N={k}: {v:.1f}" for k, v in curve.items()))

    rows: list[Row] = []
    peer = run_llama_cpp_python(shipped, prompts, n, threads, 2048, lookup=False)
    rows.append(Row(f"llama-cpp-python create_completion ({shipped.name})", 1, peer))
    if gguf_path != shipped:
        rows.append(Row(f"llama-cpp-python create_completion ({gguf_path.name})", 1,
                        run_llama_cpp_python(gguf_path, prompts, n, threads, 2048, lookup=False)))
    if args.prompt_lookup:
        rows.append(Row(f"llama-cpp-python prompt lookup ({shipped.name})", 1,
                        run_llama_cpp_python(shipped, prompts, n, threads, 2048, lookup=True)))
    plain_tps: dict[int, float] = {}
    for batch in tqdm(args.batch_sizes, desc="batch sizes"):
        tps, per_step, plain_ids = run_ours(gen, prompts, batch, "plain", n)
        plain_tps[batch] = tps
        rows.append(Row("plain", batch, tps, per_step))
        if args.oracle:
            heads = OracleDrafter(dict(zip(prompts, plain_ids)), heads.num_heads)
        drafters = {"": heads}
        if args.lookup:
            drafters[" +lookup"] = LookupDrafter(heads, lookup.min_ngram, lookup.max_ngram)
        for name, (suffix, drafter) in itertools.product(args.trees, drafters.items()):
            gen.tree = build_tree_buffers(preset_paths(name), config.tree.top_k)
            rows.append(medusa_row(gen, drafter, f"medusa {name}{suffix}", prompts, batch, n, plain_ids))
        if policy is not None:
            suffix, drafter = list(drafters.items())[-1]  # the adaptive row drafts with the lookup if it is on
            gen.tree, gen.policy = build_tree_buffers(preset_paths(args.adaptive), config.tree.top_k), policy
            rows.append(medusa_row(gen, drafter, f"medusa adaptive {args.adaptive}{suffix}", prompts, batch, n,
                                   plain_ids))
            gen.policy = None
    heads_name = "oracle" if args.oracle else config.heads.source.path if config.heads.source else "random"
    title = f"{gguf_path.name}, {threads} threads, {len(prompts)} prompts x {n} tokens, heads: {heads_name}"
    print(title)
    print(table(rows, plain_tps, peer))
    plot(rows, resolve_repo_path(args.plot), title)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
