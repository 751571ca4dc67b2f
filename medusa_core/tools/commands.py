"""The `replies`, `train`, `eval`, `tune-tree` and `export-onnx` subcommands: data -> cache -> heads -> measurements
-> tree, and the heads for other runtimes.

Caches of base-model hidden states are kept under `--cache-dir` (default `<cache root>/medusa/`), one folder per split,
data and length, in shards of `replies.SHARD` conversations: training, evaluation and tuning reuse one expensive pass
over the base model, a bigger `--train-tokens` only computes the shards it adds, and an interrupted build keeps its
finished shards. A heads folder gets `training.json` and `evaluation.json` next to the weights, and its README.md
model card is rendered from both.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

DEFAULT_HEADS = "heads/smollm2-135m-instruct"
# The shipped heads' data: the first 96 training shards answered by transformers in bf16, the rest by llama.cpp.
REPLIES = ["heads/smollm2-135m-instruct/replies", "heads/smollm2-135m-instruct/replies-llamacpp"]
MAGPIE = "heads/smollm2-135m-instruct/replies-magpie"  # replies to user turns the model wrote (tools/magpie.py)


def add_parsers(sub: argparse._SubParsersAction, default_config: str) -> None:
    tr = sub.add_parser("train", help="train Medusa heads on ShareGPT (base model frozen)")
    _common(tr, default_config)
    tr.add_argument("--out", default=DEFAULT_HEADS, help="heads folder to write (checkpoints go there too)")
    tr.add_argument("--train-tokens", type=int, default=200_000, help="tokens of held-in text to cache")
    tr.add_argument("--num-heads", type=int, default=4)
    tr.add_argument("--num-layers", type=int, default=1, help="ResBlocks per head")
    tr.add_argument("--root-conditioned", action="store_true",
                    help="heads also read the root token (the base model's choice at t); an extension of the format")
    tr.add_argument("--sequential", action="store_true",
                    help="Hydra-style: head k also reads the draft before its own (implies --root-conditioned)")
    tr.add_argument("--targets", choices=["self", "dataset", "soft"], default="self",
                    help="base model argmax, text tokens, or the base model's whole distribution")
    tr.add_argument("--max-hours", type=float, default=None,
                    help="stop (checkpointed, resumable) after this much training time; the heads are written")
    tr.add_argument("--vocab", choices=["batch", "full"], default="batch", help="softmax over batch candidates or all")
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch", type=int, default=256, help="positions per step (per worker)")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    tr.add_argument("--ray-workers", type=int, default=0, help="train data-parallel on N Ray Train workers")
    tr.add_argument("--gpu", action="store_true", help="Ray workers use one GPU each (NCCL)")
    rp = sub.add_parser("replies", help="answer conversations with the base model itself, kept as token ids (the "
                        "self-distillation data); resumes at the first missing shard")
    rp.add_argument("--config", default="configs/smollm2-135m-llamacpp.yaml", help="model config that answers")
    rp.add_argument("--prompts", choices=["sharegpt", "magpie"], default="sharegpt",
                    help="ShareGPT's user turns, or one-turn conversations whose user turn the model writes itself")
    rp.add_argument("--out", default=None, help=f"folder of reply shards (one model, setting and prompt source; "
                    f"default {REPLIES[-1]}, or {MAGPIE} for magpie)")
    rp.add_argument("--extends", nargs="*", default=None, help="folders whose shards count as made: --out "
                    "continues their numbering (conversations) with its own model and setting (default: for "
                    f"sharegpt, {' '.join(REPLIES[:-1])})")
    rp.add_argument("--train-tokens", type=int, default=5_000_000, help="reply tokens to store for training")
    rp.add_argument("--eval-tokens", type=int, default=40_000, help="reply tokens to store for held-out evaluation")
    rp.add_argument("--max-seq", type=int, default=512, help="tokens per conversation (later turns are dropped)")
    rp.add_argument("--max-reply", type=int, default=256, help="tokens per reply")
    rp.add_argument("--rows", type=int, default=8, help="conversations decoded at once (llama.cpp: its n_seq_max)")
    rp.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the config's)")
    rp.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="transformers backend: weights dtype (default: the config's)")
    ev = sub.add_parser("eval", help="per-head accuracy, accepted length and tokens/s per tree")
    _common(ev, default_config)
    ev.add_argument("--heads", default=None, help="heads folder (default: the config's heads)")
    ev.add_argument("--trees", nargs="*", default=None, help="tree presets (default: the config's tree + chains)")
    ev.add_argument("--lookup", action="store_true", help="also run every tree with prompt lookup merged into the "
                    "heads' candidates (the config's tree.lookup settings; trees deeper than the heads run only so)")
    ev.add_argument("--prompts", type=int, default=8, help="held-out chat prompts to decode")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--json", default=None, help="also write the results to this JSON file")
    ev.add_argument("--write-card", action="store_true", help="store the results as the heads folder's "
                    "evaluation.json and re-render its model card (README.md); without it the folder is left as is")
    ox = sub.add_parser("export-onnx", help="write Medusa heads as an ONNX graph: hidden state (and root token) -> "
                        "per-head logits, with the lm_head inside (onnxruntime and other runtimes)")
    ox.add_argument("--config", default=default_config, help="model config whose base model gives the lm_head "
                    "(default: embedded model)")
    ox.add_argument("--heads", default=None, help="heads folder (default: the config's heads)")
    ox.add_argument("--out", required=True, help="the .onnx file to write")
    tt = sub.add_parser("tune-tree", help="build trees from measured accuracies and pick the fastest size")
    _common(tt, default_config)
    tt.add_argument("--heads", default=None, help="heads folder (default: the config's heads)")
    tt.add_argument("--max-nodes", type=int, default=64)
    tt.add_argument("--top-k", type=int, default=10)
    tt.add_argument("--context", type=int, default=256, help="prompt length when timing verification")
    tt.add_argument("--json", default=None, help="also write the curve and the chosen tree to this JSON file")


def _common(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--config", default=default_config, help="model config YAML (default: embedded model)")
    p.add_argument("--cache-dir", default=None, help="where hidden-state caches are kept (default: "
                   "<cache root>/medusa; the cache root is $MEDUSA_CACHE or ~/.cache/medusa-serve)")
    p.add_argument("--max-seq", type=int, default=512, help="tokens per conversation (longer ones are cut)")
    p.add_argument("--eval-tokens", type=int, default=30_000, help="tokens of held-out text to cache")
    p.add_argument("--data", choices=["sharegpt", "generated"], default="sharegpt",
                   help="ShareGPT replies as written, or the base model's own greedy replies (`replies` shards)")
    p.add_argument("--replies", nargs="+", default=REPLIES + [MAGPIE], help="folders of reply shards for --data "
                   "generated; each shard comes from the first folder of its prompt source that holds it")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="transformers backend: weights dtype, and so the dtype of the cached hidden states "
                   "(default: the config's; bfloat16 caches about twice as fast on CPUs with AVX512-BF16)")


def config_and_backend(config_path: str, dtype: str | None = None):
    """The validated model config at `config_path` and its loaded backend (transformers: in `dtype` if given)."""
    from medusa_core.backends import load_backend
    from medusa_core.config import load_config

    config = load_config(config_path)
    base = config.base_model
    if dtype is not None and base.backend == "hf":
        base = base.model_copy(update={"dtype": dtype})
    return config, load_backend(base)


def states_name(backend) -> str:
    """What names a hidden-state cache's folder: caches of one model in two dtypes, or from llama.cpp, must not mix."""
    gguf = getattr(backend, "gguf_path", None)  # llama.cpp: the file whose states they are
    return f"llamacpp-{gguf.stem}" if gguf else str(backend.dtype).removeprefix("torch.")


def load_or_build_cache(backend, args, held_out: bool, data: str = "sharegpt", shard: int | None = None):
    """Load or build the held-in or held-out cache: shards of `shard` conversations (default `replies.SHARD`: cache
    shard i is reply shard i) until the token budget is met (`args`: cache_dir, max_seq, train_tokens or
    eval_tokens); a bigger budget adds shards, an interrupted build resumes at a shard. Reply folders of different
    prompt sources (source.json) are datasets of their own, each cached in its folder and taken in turn, shard i of
    each before shard i + 1, so any budget mixes them. Returns the joined cache and its shard files."""
    from medusa_core.config import cache_root, resolve_repo_path
    from medusa_core.tools.distill import HiddenCache, build_cache

    budget = args.eval_tokens if held_out else args.train_tokens
    root = resolve_repo_path(args.cache_dir) if args.cache_dir else cache_root() / "medusa"
    split = "heldout" if held_out else "train"
    sources = _cache_sources(backend, args, held_out, data, shard)
    shards, paths, index, total = [], [], 0, 0
    while sources and total < budget:
        for name, make in list(sources):
            if total >= budget:
                break
            path = root / f"{split}-{name}-{args.max_seq}-{states_name(backend)}" / f"shard-{index:04d}.pt"
            if not path.is_file():
                if (sequences := make(index)) is None:
                    sources.remove((name, make))
                    continue
                build_cache(backend, sequences, desc=f"{name} shard {index}").save(path)
            shards.append(HiddenCache.load(path, shards[0].lm_head if shards else None))  # one lm_head in memory
            paths.append(path)
            total += shards[-1].num_tokens
        index += 1
    return HiddenCache.concat(shards), paths


def _cache_sources(backend, args, held_out: bool, data: str, shard: int | None) -> list[tuple[str, Callable]]:
    """(cache name, shard index -> its sequences, None past the last) per dataset: the split's conversations as
    written, or the stored replies of each prompt source (a prefill of their ids: no decoding)."""
    from medusa_core.config import resolve_repo_path
    from medusa_core.tools import replies

    split = "held-out" if held_out else "train"
    if data == "generated":
        def stored(folders: list[Path]) -> Callable:
            def make(index: int):
                if (path := replies.find_shard(folders, held_out, index)) is None:
                    print(f"{', '.join(map(str, folders))} hold {index} {split} reply shards; `python -m medusa_core "
                          "replies` makes more")
                    return None
                return [s for s in replies.load_shard(path) if s.ids]
            return make

        datasets = replies.by_prompts([resolve_repo_path(f) for f in args.replies])
        return [("generated" + ("" if p == "sharegpt" else f"-{p}"), stored(f)) for p, f in datasets.items()]
    shard = shard or replies.SHARD
    pool: Iterator | None = None  # made at the first shard to build, skipping the ones already cached

    def written(index: int):
        nonlocal pool
        pool = pool or _sequences(backend, args, held_out, skip=index * shard)
        if not (chunk := list(itertools.islice(pool, shard))):
            print(f"the {'held-out' if held_out else 'held-in'} split ran out at {index} shards")
            return None
        return chunk
    return [("sharegpt", written)]


def _conversations(held_out: bool) -> list:
    """The split's conversations in their fixed order."""
    from medusa_core.tools import data as sharegpt

    conversations, report = sharegpt.read_sharegpt()
    print(f"ShareGPT: {report.complete} complete items, {report.truncated_tail} truncated tail item skipped, "
          f"{report.unusable} without a user->assistant exchange, {report.kept} kept")
    held_in, held_out_convs = sharegpt.split(conversations)
    print(f"split: {len(held_in)} held-in, {len(held_out_convs)} held-out conversations")
    return held_out_convs if held_out else held_in


def _sequences(backend, args, held_out: bool, skip: int) -> Iterator:
    """The split's usable conversations as written, encoded, in a fixed order, after `skip`."""
    from medusa_core.tools import data as sharegpt

    for conv in _conversations(held_out):
        seq = sharegpt.encode_conversation(backend.tokenizer, conv.messages, args.max_seq)
        if any(seq.assistant) and skip > 0:
            skip -= 1
        elif any(seq.assistant):
            yield seq


def replies_command(args: argparse.Namespace) -> None:
    from medusa_core.backends import load_backend
    from medusa_core.config import load_config, resolve_repo_path
    from medusa_core.tools import replies
    from medusa_core.tools.magpie import UserTurns

    config = load_config(args.config)
    base = config.base_model
    llamacpp = {"n_seq_max": args.rows} | ({"n_threads": args.threads} if args.threads else {})
    base = base.model_copy(update={"llamacpp": base.llamacpp.model_copy(update=llamacpp)} if base.backend ==
                           "llamacpp" else {"dtype": args.dtype or base.dtype})
    backend = load_backend(base)
    magpie = args.prompts == "magpie"
    out = resolve_repo_path(args.out or (MAGPIE if magpie else REPLIES[-1]))
    source = {"model": config.name, "prompts": args.prompts, "backend": base.backend, "max_seq": args.max_seq,
              "max_reply": args.max_reply,
              "weights": base.llamacpp.requantize or base.gguf_file if base.backend == "llamacpp" else base.dtype}
    chain = ([] if magpie else REPLIES[:-1]) if args.extends is None else args.extends
    extends = [resolve_repo_path(f) for f in chain]
    replies.check_extends(extends, source)
    replies.check_source(out, source)
    for held_out, budget in ((True, args.eval_tokens), (False, args.train_tokens)):
        conversations = UserTurns(backend, held_out, args.rows) if magpie else _conversations(held_out)
        stored = replies.build(backend, conversations, out, held_out, budget, args.max_seq, args.max_reply,
                               rows=args.rows, extends=extends)
        print(f"{stored} {'held-out' if held_out else 'train'} reply tokens in {out}"
              + "".join(f" and {f}" for f in extends))


def train_command(args: argparse.Namespace) -> None:
    from medusa_core.config import resolve_repo_path
    from medusa_core.heads import save_heads
    from medusa_core.tools import replies
    from medusa_core.tools.train import TrainConfig, train, train_ray

    config, backend = config_and_backend(args.config, args.dtype)
    cache, cache_paths = load_or_build_cache(backend, args, held_out=False, data=args.data)
    cfg = TrainConfig(num_heads=args.num_heads, num_layers=args.num_layers,
                      root_conditioned=args.root_conditioned or args.sequential, sequential=args.sequential,
                      targets=args.targets, vocab=args.vocab, steps=args.steps, batch_positions=args.batch,
                      lr=args.lr, seed=args.seed)
    print(f"training on {cache.num_tokens} cached tokens ({int(cache.assistant.sum())} assistant): {cfg}")
    start = time.perf_counter()
    if args.ray_workers > 0:
        import ray

        ray.init(num_cpus=max(args.ray_workers, 1), include_dashboard=False, ignore_reinit_error=True)
        heads = train_ray(cache_paths, cfg, args.out, args.ray_workers, args.gpu)
        seconds, losses = time.perf_counter() - start, []
    else:
        max_seconds = None if args.max_hours is None else args.max_hours * 3600
        result = train(cache, cfg, args.out, resume=not args.no_resume, max_seconds=max_seconds)
        heads, seconds, losses = result.heads, result.seconds, result.losses
    heldout, _ = load_or_build_cache(backend, args, held_out=True, data=args.data)
    accuracy = _accuracy(heads, heldout)
    prompts = list(replies.by_prompts([resolve_repo_path(f) for f in args.replies])) if args.data == "generated" \
        else ["sharegpt"]
    info = {"base_model": config.name, "data": args.data, "prompts": prompts, "train_tokens": cache.num_tokens,
            "train_assistant_tokens": int(cache.assistant.sum()), "heldout_tokens": heldout.num_tokens,
            "max_seq": args.max_seq, "config": asdict(cfg), "ray_workers": args.ray_workers,
            "train_seconds": round(seconds, 1), "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
            "heldout_accuracy": accuracy}
    save_heads(heads, args.out, config.name)
    (Path(args.out) / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    write_card(Path(args.out))
    print(_format_accuracy(accuracy))


def _accuracy(heads, heldout) -> dict[str, list[dict[str, float]]]:
    from medusa_core.tools.evaluate import accuracy_table, rank_histogram

    return {kind: accuracy_table(rank_histogram(heads, heldout, kind)) for kind in ("self", "dataset")}


def _format_accuracy(accuracy: dict) -> str:
    lines = ["held-out accuracy (targets: base model argmax = self, text tokens = dataset)",
             f"{'head':>4}{'self top1':>11}{'self top5':>11}{'data top1':>11}{'data top5':>11}"]
    for s, d in zip(accuracy["self"], accuracy["dataset"]):
        lines.append(f"{s['head']:>4}{s['top1']:>11.3f}{s['top5']:>11.3f}{d['top1']:>11.3f}{d['top5']:>11.3f}")
    return "\n".join(lines)


def _load_heads(config, backend, folder: str | None):
    from medusa_core.generator import load_drafter
    from medusa_core.heads import load_heads

    if folder is None and config.heads is None:
        raise SystemExit(f"{config.name}: the config has no heads; name a heads folder with --heads")
    if folder is None:
        return load_drafter(config.heads, backend.hidden_size, backend.vocab_size, backend.dtype, backend.device)
    head_vocab = config.heads.head_vocab if config.heads else None
    return load_heads(folder, backend.hidden_size, backend.vocab_size, head_vocab).to(backend.dtype)


def eval_command(args: argparse.Namespace) -> None:
    from medusa_core.config import LookupConfig, TreeConfig
    from medusa_core.lookup import LookupDrafter
    from medusa_core.tools import data as sharegpt
    from medusa_core.tools.evaluate import benchmark_trees, format_runs
    from medusa_core.tree import build_tree_buffers
    from medusa_core.tree_presets import preset_paths

    config, backend = config_and_backend(args.config, args.dtype)
    heads = _load_heads(config, backend, args.heads)
    heldout, _ = load_or_build_cache(backend, args, held_out=True, data=args.data)
    accuracy = _accuracy(heads, heldout)
    print(_format_accuracy(accuracy))
    tree = config.tree or TreeConfig(preset="chain_1")  # a config without heads has no tree of its own
    chains = [f"chain_{d}" for d in range(2, heads.num_heads + 1)]
    names = args.trees or [tree.preset or "config", *chains]
    trees = {n: build_tree_buffers(tree.resolved_paths() if n == "config" else preset_paths(n), tree.top_k)
             for n in names}
    drafted = {n: (heads, t) for n, t in trees.items() if t.max_depth <= heads.num_heads}
    if args.lookup:
        lookup = tree.lookup or LookupConfig()
        drafter = LookupDrafter(heads, lookup.min_ngram, lookup.max_ngram)
        drafted |= {f"{n}+lookup": (drafter, t) for n, t in trees.items()}
    if not drafted:
        raise SystemExit(f"every tree is deeper than the {heads.num_heads} heads; add --lookup to run them")
    _, held_out = sharegpt.split(sharegpt.read_sharegpt()[0])
    prompts = [p for c in held_out if (p := sharegpt.first_turn_prompt(backend.tokenizer, c, 160))][: args.prompts]
    runs = benchmark_trees(backend, drafted, prompts, args.max_new_tokens)
    print(format_runs(runs))
    result = {"accuracy": accuracy, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "runs": [{**asdict(r), "accepted_length": r.accepted_length, "tokens_per_second": r.tokens_per_second,
                        "speedup": r.tokens_per_second / runs[0].tokens_per_second} for r in runs]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.write_card:
        source = config.heads.source if config.heads else None
        folder = args.heads or (source.path if source else None)
        if folder is None or not Path(folder).is_dir():
            raise SystemExit(f"--write-card: {folder} is not a local heads folder")
        folder = Path(folder)
        (folder / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
        write_card(folder)


def tune_tree_command(args: argparse.Namespace) -> None:
    from medusa_core.tools.evaluate import rank_histogram
    from medusa_core.tools.tune_tree import choose_size, format_curve, greedy_tree, measure_step_cost

    config, backend = config_and_backend(args.config, args.dtype)
    heads = _load_heads(config, backend, args.heads)
    heldout, _ = load_or_build_cache(backend, args, held_out=True, data=args.data)
    acc = rank_histogram(heads, heldout, "self", max_rank=args.top_k)  # [K, top_k]
    costs = measure_step_cost(backend, heads, acc, args.max_nodes, args.context)
    best, curve = choose_size(acc, costs)
    print(format_curve(curve, best))
    paths = greedy_tree(acc, best.nodes)
    print(f"best: {best.nodes} nodes, expected {best.expected_length:.2f} tokens/step; tree.paths: {paths}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "rank_accuracy": acc.tolist(), "costs": [asdict(c) for c in costs],
            "curve": [{**asdict(s), "tokens_per_second": s.tokens_per_second} for s in curve],
            "best_nodes": best.nodes, "best_paths": paths}, indent=2) + "\n")


def export_onnx_command(args: argparse.Namespace) -> None:
    import torch

    from medusa_core.tools.onnx_export import export

    config, backend = config_and_backend(args.config)
    heads = _load_heads(config, backend, args.heads)
    lm_head = backend.lm_head_rows(torch.arange(backend.vocab_size))  # [V, H]: the shared lm_head, all rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = export(heads, lm_head, out)
    vocab = heads.head_vocab or backend.vocab_size
    print(f"{out}: {heads.num_heads} heads, inputs {', '.join(names)} -> logits [B, {heads.num_heads}, {vocab}] "
          f"({out.stat().st_size / 1e6:.0f} MB)")


def write_card(folder: Path) -> None:
    """Render README.md from training.json and evaluation.json (whichever exist), keeping the card's hand-written
    part (from `HAND_WRITTEN` on) as it is."""
    from medusa_core.tools.model_card import HAND_WRITTEN, render_card

    train = json.loads((folder / "training.json").read_text()) if (folder / "training.json").is_file() else None
    ev = json.loads((folder / "evaluation.json").read_text()) if (folder / "evaluation.json").is_file() else None
    card = folder / "README.md"
    kept = card.read_text().partition(HAND_WRITTEN) if card.is_file() else ("", "", "")
    card.write_text(render_card(train, ev) + ("\n" + kept[1] + kept[2] if kept[1] else ""))
