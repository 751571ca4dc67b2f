"""Heads side by side: architecture x targets x data size, judged on held-out replies and on chat never trained on.

    python -m medusa_core replies --rows 64 --threads 2   # the data: resumes after the last stored shard
    python benchmarks/heads_compare.py --train-tokens 200000 400000 --steps 2000
    python benchmarks/heads_compare.py --heads heads/smollm2-135m-instruct /path/to/new-heads   # trained folders

Every variant trains from scratch on the first N reply tokens (`--train-tokens`, one cache of the stored self-distilled
replies), for the same steps and batch. Then, per variant:
- per-head top-1/top-5 against the base model's argmax on held-out generated replies (what greedy acceptance needs);
- tokens/step with chains of 2 and 4 heads (the served llama.cpp backend verifies chains), real greedy decoding on
  (a) held-out ShareGPT first turns and (b) `benchmarks/data/chat_prompts.json`, output checked equal to plain;
- draft ms per step at batch 1 and tokens/s against plain decoding on the served backend (interleaved runs).
Prints one table (markdown) and saves a plot beside the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import types
from dataclasses import asdict
from pathlib import Path

import torch

from medusa_core.tools import data as sharegpt
from medusa_core.tools.commands import REPLIES, config_and_backend, load_or_build_cache
from medusa_core.config import REPO_ROOT
from medusa_core.tools.evaluate import accuracy_table, benchmark_trees, rank_histogram
from medusa_core.tools.train import TrainConfig, train
from medusa_core.tree import build_tree_buffers
from medusa_core.tree_presets import preset_paths

ARCHS = {  # name -> TrainConfig fields
    "medusa-4": dict(num_heads=4),
    "medusa-5": dict(num_heads=5),
    "rooted-4": dict(num_heads=4, root_conditioned=True),
    "sequential-4": dict(num_heads=4, root_conditioned=True, sequential=True),
    "sequential-5": dict(num_heads=5, root_conditioned=True, sequential=True),
}
TARGETS = {"hard": "self", "soft": "soft"}
CHAT_PROMPTS = REPO_ROOT / "benchmarks" / "data" / "chat_prompts.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--train-tokens", nargs="*", type=int, default=[400_000], help="data sizes to compare")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--layers", type=int, default=2, help="ResBlocks per head")
    p.add_argument("--prompts", type=int, default=8, help="prompts per set (held-out ShareGPT, chat)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--replies", nargs="+", default=REPLIES, help="folders of reply shards (the first "
                   "folder holding a shard gives it)")
    p.add_argument("--cache-dir", default=None, help="hidden-state caches (default: <cache root>/medusa)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the transformers model whose hidden states the heads learn from")
    p.add_argument("--served", default="configs/smollm2-135m-llamacpp.yaml", help="backend the decoding runs on")
    p.add_argument("--heads", nargs="*", default=None, help="measure these trained heads folders instead of "
                   "training variants (train top-1 on the first 100k cached tokens, which every stored head saw)")
    p.add_argument("--json", default="benchmarks/results/heads_compare.json")
    args = p.parse_args()
    _, hf = config_and_backend("configs/smollm2-135m.yaml", args.dtype)  # the hidden states the heads learn from
    heldout = _cache(hf, args, held_out=True, tokens=40_000)[0]
    served_config, served = config_and_backend(args.served)
    torch.set_num_threads(os.cpu_count() or 1)  # the served config sets torch to 1 thread (llama.cpp has the rest)
    prompt_sets = _prompt_sets(served, args.prompts)
    rows = [] if not args.heads else _trained(args, hf, heldout, served, served_config, prompt_sets)
    for tokens in [] if args.heads else args.train_tokens:
        cache, _ = _cache(hf, args, held_out=False, tokens=tokens)
        for arch in args.archs:
            for target in args.targets:
                cfg = TrainConfig(num_layers=args.layers, targets=TARGETS[target], steps=args.steps,
                                  batch_positions=args.batch, **ARCHS[arch])
                row = {"arch": arch, "targets": target, "train_tokens": cache.num_tokens,
                       "assistant_tokens": int(cache.assistant.sum()), "config": asdict(cfg)}
                result = train(cache, cfg)
                heads = result.heads
                heads.head_vocab = served_config.heads.head_vocab
                row["train_seconds"] = round(result.seconds, 1)
                row["heldout"] = accuracy_table(rank_histogram(heads, heldout, "self"))
                row["train_top1"] = accuracy_table(rank_histogram(heads, cache, "self", max_positions=1000))
                row |= _decode(served, heads.to(served.dtype), prompt_sets, args.max_new_tokens)
                rows.append(row)
                print(_table(rows), flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "batch": args.batch, "layers": args.layers,
                               "max_new_tokens": args.max_new_tokens, "rows": rows}, indent=2) + "\n")
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _trained(args, hf, heldout, served, served_config, prompt_sets) -> list[dict]:
    """One row per heads folder in --heads, measured as the trained variants are."""
    from medusa_core.heads import load_heads

    seen, _ = _cache(hf, args, held_out=False, tokens=100_000)
    rows = []
    for folder in args.heads:
        info = json.loads((Path(folder) / "training.json").read_text())
        cfg = info["config"]
        heads = load_heads(folder, hf.hidden_size, hf.vocab_size, served_config.heads.head_vocab)
        arch = "sequential" if cfg.get("sequential") else "rooted" if cfg.get("root_conditioned") else "medusa"
        row = {"arch": f"{Path(folder).name} ({arch}-{heads.num_heads})", "targets": cfg["targets"],
               "train_tokens": info["train_tokens"], "assistant_tokens": info["train_assistant_tokens"],
               "config": cfg, "train_seconds": info["train_seconds"]}
        row["heldout"] = accuracy_table(rank_histogram(heads, heldout, "self"))
        row["train_top1"] = accuracy_table(rank_histogram(heads, seen, "self", max_positions=1000))
        row |= _decode(served, heads.to(served.dtype), prompt_sets, args.max_new_tokens)
        rows.append(row)
        print(_table(rows), flush=True)
    return rows


def _cache(backend, args, held_out: bool, tokens: int):
    ns = types.SimpleNamespace(cache_dir=args.cache_dir, max_seq=512, train_tokens=tokens, eval_tokens=tokens,
                               replies=args.replies)
    return load_or_build_cache(backend, ns, held_out=held_out, data="generated")


def _prompt_sets(backend, n: int) -> dict[str, list[list[int]]]:
    _, held_out = sharegpt.split(sharegpt.read_sharegpt()[0])
    tok = backend.tokenizer
    shared = [p for c in held_out if (p := sharegpt.first_turn_prompt(tok, c, 160))][-n:]  # not the replies' shards
    chat = json.loads(CHAT_PROMPTS.read_text())["prompts"][:n]
    render = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
              for c in chat]
    return {"sharegpt": shared, "chat": [tok.encode(t, add_special_tokens=False) for t in render]}


def _decode(backend, heads, prompt_sets: dict, max_new_tokens: int) -> dict:
    """Tokens/step and tokens/s against plain for chains of 2 and 4 heads, on each prompt set; draft ms at batch 1."""
    chains = {f"chain_{d}": (heads, build_tree_buffers(preset_paths(f"chain_{d}"), 10)) for d in (2, 4)}
    out = {}
    for name, prompts in prompt_sets.items():
        runs = benchmark_trees(backend, chains, prompts, max_new_tokens)
        plain = runs[0].tokens_per_second
        out[name] = {r.name: {"tokens_per_step": round(r.accepted_length, 3), "speedup": round(
            r.tokens_per_second / plain, 3), "same_as_plain": r.matches_plain} for r in runs[1:]}
    fwd, _ = backend.prefill([prompt_sets["chat"][0]])
    root = fwd.logits[:, 0].argmax(-1)
    heads.draft(fwd.hidden[:, 0], root, [[]], 4, 10, backend)  # warm-up
    start = time.perf_counter()
    for _ in range(20):
        heads.draft(fwd.hidden[:, 0], root, [[]], 4, 10, backend)
    out["draft_ms"] = round((time.perf_counter() - start) / 20 * 1000, 2)
    return out


def _table(rows: list[dict]) -> str:
    lines = ["| heads | targets | train tokens | h1 / h2 / ... top1 | h1 top5 | train h1 top1 | "
             "chain_2 tok/step ShareGPT / chat | chain_4 tok/step ShareGPT / chat | chain_4 speed-up chat | "
             "draft ms | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        top1 = " / ".join(f"{a['top1']:.3f}" for a in r["heldout"])
        c2 = f"{r['sharegpt']['chain_2']['tokens_per_step']:.2f} / {r['chat']['chain_2']['tokens_per_step']:.2f}"
        c4 = f"{r['sharegpt']['chain_4']['tokens_per_step']:.2f} / {r['chat']['chain_4']['tokens_per_step']:.2f}"
        same = all(v["same_as_plain"] for s in ("sharegpt", "chat") for v in r[s].values())
        lines.append(f"| {r['arch']} | {r['targets']} | {r['train_tokens']:,} | {top1} | "
                     f"{r['heldout'][0]['top5']:.3f} | {r['train_top1'][0]['top1']:.3f} | {c2} | {c4} | "
                     f"{r['chat']['chain_4']['speedup']:.2f}x{'' if same else ' (NOT same)'} | {r['draft_ms']:.1f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['arch']}\n{r['targets']}, {r['train_tokens'] // 1000}k" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(rows)), 4.5))
    for k in range(4):
        a.plot(names, [r["heldout"][k]["top1"] for r in rows], marker="o", label=f"head {k + 1}")
    a.set_ylabel("held-out top-1 vs base argmax")
    a.legend()
    x = torch.arange(len(rows)).float()
    for i, (s, c) in enumerate([("sharegpt", "chain_4"), ("chat", "chain_4"), ("chat", "chain_2")]):
        b.bar(x + (i - 1) * 0.27, [r[s][c]["tokens_per_step"] for r in rows], 0.27, label=f"{s} {c}")
    b.set_xticks(x, names)
    b.set_ylabel("tokens / step (greedy, llama.cpp)")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
