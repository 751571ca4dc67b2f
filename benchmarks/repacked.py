"""Do llama.cpp's repacked weight layouts make a chain pass cheap? A chain of N tokens timed with and without them.

    python benchmarks/repacked.py [--encodings Q4_1 Q8_0 Q4_0] [--nodes 1 2 3 4 5 8] [--threads 1] [--repeats 5]

The backend loads every GGUF with `use_extra_bufts = false` (docs/design.md, "Plain weight buffers"). With it on,
llama.cpp may copy a tensor into a repacked layout whose matmul multiplies rows in blocks (on x86: Q4_0, Q4_K,
IQ4_NL), the kind of kernel a Medusa verification pass of a few rows needs. For each encoding of the embedded GGUF
and either setting it times `llama_decode` of a one-row chain of N tokens after a 200-token prompt (raw llama.cpp,
as cost_curve.py's raw column; settings and N take turns, best of `--repeats` after a warm-up round), and checks
that the N-token pass gives the logits of N one-token passes (what Medusa's equality with plain decoding needs).
Prints a markdown table: ms, x the N=1 pass of the same row, and the largest logit difference.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from medusa_core.backends.gguf_files import route_llama_log_once
from medusa_core.backends.hf import resolve_source
from medusa_core.backends.llamacpp import LlamaCppBackend, requantized
from medusa_core.config import LlamaCppConfig, load_config, models_cache, resolve_repo_path
from medusa_core.timing import fastest_in_turns

PROMPT = 200


class Context:
    """One llama.cpp model and context of one sequence, loaded with or without extra weight buffers."""

    def __init__(self, lc, path: Path, extra_buffers: bool, settings: LlamaCppConfig):
        self.lc = lc
        params = lc.llama_model_default_params()
        params.use_extra_bufts = extra_buffers
        self.model = lc.llama_model_load_from_file(str(path).encode(), params)
        # The backend's own context settings (ubatch, flash attention, KV type, ...), for one row of 1,024 cells.
        self.ctx = lc.llama_init_from_model(self.model, LlamaCppBackend._context_params(settings, 1024))
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(512, 0, 1)
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))

    def decode(self, tokens: list[int], start: int) -> np.ndarray:
        """Logits [N, V] of `tokens` at positions start, start + 1, ..."""
        b = self.batch
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, start + i, 1, True
            b.seq_id[i][0] = 0
        b.n_tokens = len(tokens)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(len(tokens) * self.vocab,)).reshape(
            len(tokens), self.vocab)

    def timed_chain(self, tokens: list[int]) -> float:
        start = time.perf_counter()
        self.decode(tokens, PROMPT)
        seconds = time.perf_counter() - start
        self.lc.llama_memory_seq_rm(self.mem, 0, PROMPT, -1)  # untimed: the context stays at the prompt
        return seconds

    def chain_difference(self, tokens: list[int]) -> float:
        """Largest |logit| difference between one pass of `tokens` and one pass per token."""
        alone = np.stack([self.decode([t], PROMPT + i)[0].copy() for i, t in enumerate(tokens)])
        self.lc.llama_memory_seq_rm(self.mem, 0, PROMPT, -1)
        together = self.decode(tokens, PROMPT).copy()
        self.lc.llama_memory_seq_rm(self.mem, 0, PROMPT, -1)
        return float(np.abs(together - alone).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/smollm2-135m-llamacpp.yaml")
    p.add_argument("--encodings", nargs="+", default=["Q4_1", "Q8_0", "Q4_0"])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import llama_cpp as lc

    route_llama_log_once()  # llama.cpp's load log into Python's logging, not onto the table
    lc.llama_backend_init()
    base = load_config(resolve_repo_path(args.config)).base_model
    src = Path(resolve_source(base.source)) / base.gguf_file
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, 40_000, PROMPT)]
    tokens = [int(t) for t in rng.integers(100, 40_000, max(args.nodes))]
    print("| encoding | extra buffers | " + " | ".join(f"N={n} ms" for n in args.nodes) + " | max logit diff |")
    print("|" + "---|" * (3 + len(args.nodes)))
    for encoding in args.encodings:
        path = src if encoding == "Q4_1" else requantized(src, encoding, models_cache(base))
        settings = base.llamacpp.model_copy(update={"n_seq_max": 1, "n_threads": args.threads})
        contexts = [Context(lc, path, extra, settings) for extra in (False, True)]
        for c in contexts:
            c.decode(prompt, 0)
        diffs = [max(c.chain_difference(tokens[:n]) for n in args.nodes if n > 1) for c in contexts]
        steps = [lambda c=c, n=n: c.timed_chain(tokens[:n]) for c in contexts for n in args.nodes]
        times = fastest_in_turns(steps, args.repeats, desc=encoding)
        for i, (c, diff) in enumerate(zip(("off", "on"), diffs)):
            ms = [1000 * t for t in times[i * len(args.nodes):(i + 1) * len(args.nodes)]]
            cells = [f"{m:.1f}" + (f" ({m / ms[0]:.2f}x)" if n > 1 else "") for m, n in zip(ms, args.nodes)]
            print(f"| {encoding} | {c} | " + " | ".join(cells) + f" | {diff:g} |", flush=True)


if __name__ == "__main__":
    main()
