"""What one verification pass costs: our backend's step against the library's raw call for the same tokens.

    python benchmarks/cost_curve.py [--config configs/smollm2-135m-llamacpp.yaml] [--encodings Q4_1 F16 BF16 Q8_0 Q4_0]
        [--nodes 1 2 4 8 16] [--batch-sizes 1 4 8] [--context 200] [--long 1000] [--repeats 5] [--threads N]
        [--hf float32 bfloat16] [--device cuda] [--random-llama vicuna-7b]

For every encoding of the embedded GGUF (Q4_1 as shipped, the others re-encoded by llama.cpp's quantizer), batch
size B and chain of N nodes it times, after a B-row prefill of `--context` tokens:
- ours: one step through the backend, `verify` + `keep` (everything the decode loop asks of the backend);
- raw: `llama_decode` alone of the same B x N tokens on the same context (batch filled and cells removed untimed);
and the same again after `--long` more tokens of context (a long request). The two take turns, best of `--repeats`
rounds after a warm-up round. With `--hf`, the transformers backend's step (ours only) in those dtypes, on
`--device` (default: the config's); with `--random-llama NAME` on a random-weight Llama of that shape (RANDOM_LLAMAS;
vicuna-7b is Vicuna-7B's, built on the device, nothing downloaded) instead of `--hf-config`'s model.
Prints a markdown table (ms, and ours/raw) and plots ms per step against N (benchmarks/results/cost_curve.png).
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from medusa_core.backends import load_backend
from medusa_core.backends.hf import DTYPES, HFBackend
from medusa_core.config import load_config, resolve_repo_path
from medusa_core.tree import build_tree_buffers
from medusa_core.timing import fastest_in_turns, timed_step

TOKEN = 1000  # content does not change the cost
# Shapes for --random-llama: the cost of a step depends on the shape, not on the weights.
RANDOM_LLAMAS = {
    "vicuna-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 2048},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
             "vocab_size": 2048, "max_position_embeddings": 2048},
}


def chain(nodes: int):
    return build_tree_buffers([[0] * d for d in range(1, nodes)], top_k=1)


def raw_decode(backend, cache, batch: int, nodes: int) -> float:
    """Seconds of llama_decode alone for `batch` rows x `nodes` chain tokens after each row's cells; the cells are
    removed again (untimed), so the context stays as it was."""
    lc, b = backend.lc, backend.batch
    n = 0
    for row in range(batch):
        for t in range(nodes):
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = TOKEN, cache.lens[row] + t, 1, True
            b.seq_id[n][0] = row
            n += 1
    b.n_tokens = n
    start = time.perf_counter()
    if lc.llama_decode(backend.ctx, b) != 0:
        return float("inf")
    lc.llama_synchronize(backend.ctx)
    seconds = time.perf_counter() - start
    for row in range(batch):
        lc.llama_memory_seq_rm(backend.mem, row, cache.lens[row], -1)
    return seconds


def ours(backend, cache, batch: int, nodes: int) -> float:
    seconds = timed_step(backend, cache, chain(nodes), batch)  # accepts the root: the context grows by one
    for row in range(batch):  # ... so take it back, to time every round at the same context length
        backend.lc.llama_memory_seq_rm(backend.mem, row, cache.lens[row] - 1, -1)
        cache.lens[row] -= 1
    return seconds


def hf_step(backend, cache, batch: int, nodes: int) -> float:
    # CUDA kernels run asynchronously: wait for the queue before and after, or the time is the launch time only.
    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if timed_step(backend, cache, chain(nodes), batch) == float("inf"):  # the context grows by one: negligible
        return float("inf")
    sync()
    return time.perf_counter() - start


def sweep(backend, name: str, args, timers) -> list[dict]:
    """Time `timers` (ours, then raw where there is one) for every context, batch size and chain length, in turns."""
    rows = []
    for context in (args.context, args.context + args.long):
        for batch in args.batch_sizes:
            prompt = [(TOKEN + i) % backend.vocab_size for i in range(context)]
            _, cache = backend.prefill([prompt] * batch)
            steps = [partial(fn, backend, cache, batch, n) for n in args.nodes for fn in timers]
            times = iter(fastest_in_turns(steps, args.repeats, desc=f"{name} B={batch} context={context}"))
            for n in args.nodes:
                ms = [1000 * next(times) for _ in timers] + [None]
                rows.append({"backend": name, "context": context, "batch": batch, "nodes": n, "ours_ms": ms[0],
                             "raw_ms": ms[1]})
    return rows


def measure_llamacpp(config, encoding: str, args) -> list[dict]:
    requantize = None if encoding == "Q4_1" else encoding
    update = {"requantize": requantize, "n_seq_max": max(args.batch_sizes)}
    if args.threads:
        update["n_threads"] = args.threads
    settings = config.base_model.llamacpp.model_copy(update=update)
    backend = load_backend(config.base_model.model_copy(update={"llamacpp": settings}))
    return sweep(backend, f"llama.cpp {encoding}", args, (ours, raw_decode))


def measure_hf(config_path: str, dtype: str, args) -> list[dict]:
    if args.random_llama is not None:
        backend, name = random_llama(args.random_llama, dtype, args.device or "cpu"), args.random_llama
    else:
        config = load_config(resolve_repo_path(config_path))
        update = {"dtype": dtype} | ({"device": args.device} if args.device else {})
        backend, name = load_backend(config.base_model.model_copy(update=update)), config.name
    return sweep(backend, f"transformers {dtype} {backend.device.type} {name}", args, (hf_step,))


def random_llama(shape: str, dtype: str, device: str) -> HFBackend:
    """A random-weight Llama of a RANDOM_LLAMAS shape, initialised directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**RANDOM_LLAMAS[shape]), dtype=DTYPES[dtype])
    return HFBackend(model, tokenizer=None)


def table(rows: list[dict], nodes: list[int]) -> str:
    head = "| backend | context | B | " + " | ".join(f"N={n} ms (x raw)" for n in nodes) + " |"
    lines = [head, "|" + "---|" * (3 + len(nodes))]
    keys = sorted({(r["backend"], r["context"], r["batch"]) for r in rows}, key=lambda k: (rows.index(
        next(r for r in rows if (r["backend"], r["context"], r["batch"]) == k))))
    for key in keys:
        cells = []
        for n in nodes:
            r = next(r for r in rows if (r["backend"], r["context"], r["batch"], r["nodes"]) == (*key, n))
            ratio = f" ({r['ours_ms'] / r['raw_ms']:.2f}x)" if r["raw_ms"] else ""
            cells.append(f"{r['ours_ms']:.1f}{ratio}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, context: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for name in dict.fromkeys(r["backend"] for r in rows):
            sel = [r for r in rows if r["backend"] == name and r["batch"] == batch and r["context"] == context]
            line, = ax.plot([r["nodes"] for r in sel], [r["ours_ms"] for r in sel], marker="o", label=f"{name} ours")
            if sel and sel[0]["raw_ms"] is not None:
                ax.plot([r["nodes"] for r in sel], [r["raw_ms"] for r in sel], ls="--", color=line.get_color(),
                        label=f"{name} raw llama_decode")
        ax.set(title=f"batch {batch}, context {context}", xlabel="chain nodes N per row", ylabel="ms per step",
               xscale="log", xticks=sorted({r["nodes"] for r in rows}))
        ax.set_xticklabels(sorted({r["nodes"] for r in rows}))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/smollm2-135m-llamacpp.yaml")
    p.add_argument("--encodings", nargs="*", default=["Q4_1", "F16", "BF16", "Q8_0", "Q4_0"])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--long", type=int, default=1000, help="extra context tokens of the long-request rows")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: the config's n_threads)")
    p.add_argument("--hf", nargs="*", default=[], choices=["float32", "float16", "bfloat16"])
    p.add_argument("--hf-config", default="configs/smollm2-135m.yaml")
    p.add_argument("--device", help="torch device of the --hf rows (default: --hf-config's; cpu with --random-llama)")
    p.add_argument("--random-llama", choices=sorted(RANDOM_LLAMAS), help="time a random-weight Llama of this shape")
    p.add_argument("--out", default="benchmarks/results/cost_curve")
    args = p.parse_args()
    torch.set_num_threads(1)
    config = load_config(resolve_repo_path(args.config))
    rows = [r for enc in args.encodings for r in measure_llamacpp(config, enc, args)]
    rows += [r for dtype in args.hf for r in measure_hf(args.hf_config, dtype, args)]
    threads = (args.threads or config.base_model.llamacpp.n_threads) if args.encodings else torch.get_num_threads()
    print(f"\nms per step (best of {args.repeats}), {threads} thread(s); ours = verify + keep, raw = llama_decode")
    if args.encodings:  # which matmul kernels this llama-cpp-python build has (LLAMAFILE: tinyBLAS for 2+ rows)
        import llama_cpp

        print(llama_cpp.llama_print_system_info().decode().strip())
    print()
    print(table(rows, args.nodes))
    out = resolve_repo_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot(rows, out.with_suffix(".png"), args.context)
    print(f"\nplot: {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
