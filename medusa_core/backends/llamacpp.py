"""llama.cpp backend: a GGUF base model through llama-cpp-python's low-level API, a Medusa tree in one llama_decode.

The context returns logits and the final-norm hidden state of every output token (`embeddings=True`, no pooling);
the Medusa heads run in torch on that hidden state, with the output matrix read from the GGUF file.

Tree verification uses llama.cpp's sequences as the tree mask. Each row owns P sequences (P = leaf paths of the
tree) that all hold the row's accepted tokens. A tree node enters the batch at position len_b + depth and belongs
to the sequences of every leaf path through it; since a token attends to the cells of its own sequences at earlier
or equal positions, it sees the prefix and exactly its ancestors. After acceptance the accepted nodes are copied
into all the row's sequences and every other node is removed (`llama_memory_seq_rm/cp`), so the row again holds
one path. All rows of a batch go into the same llama_decode.

One batch at a time: a context holds one KV cache, and a `prefill` that starts a batch clears it (a prefill into the
running batch takes free sequences and appends cells). A cache from an earlier batch then raises instead of reading
someone else's cells.

Exactness: a row's cells must stay in position order, because attention sums over cells in cell order. So the
cells of rejected nodes (and of rows that leave the batch) are not freed: they move to a reserved trash sequence
that nobody attends to, until the next prefill clears the context; freed holes would be refilled by later tokens
at lower cell indices. The cost is memory: a batch needs n_ctx >= its prompts + outputs + T cells per row per step.
Two context settings matter as well (measured on
the SmolLM2 Q4_1 file): flash attention on, so that each query row is computed alone (off, the KQ matmul tiles by
batch shape), and compute passes (n_ubatch) under 64 tokens, where llama.cpp's CPU matmul switches kernel. With
the three, a tree pass reproduces the sequential pass bit for bit; without them the tiny float differences pass
through the 8-bit activation quantization of Q4/Q8 weights and move logits by up to ~2.
"""
from __future__ import annotations

import ctypes
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from medusa_core.backends import Forward
from medusa_core.backends.kernels import rows_linear
from medusa_core.config import BaseModelConfig, LlamaCppConfig, resolve_repo_path
from medusa_core.tree import TreeBuffers

GGML_TYPE = {"f32": 0, "f16": 1}
GGML_LOG_WARN, GGML_LOG_CONT = 3, 5  # ggml_log_level (llama_cpp._logger maps an older numbering)


def set_llama_log(sink: Callable[[str], None] | None = None) -> None:
    """Route llama.cpp's log: warnings and errors to stderr (its load log is hundreds of INFO lines), and every
    line to `sink` if given. Process-wide in llama.cpp; the callback is kept alive in _LOG_CALLBACKS."""
    import sys

    import llama_cpp as lc

    last = [0]

    def log(level: int, text: bytes, _data) -> None:
        last[0] = last[0] if level == GGML_LOG_CONT else level
        line = text.decode(errors="replace")
        if last[0] >= GGML_LOG_WARN:
            print(line, end="", file=sys.stderr, flush=True)
        if sink is not None:
            sink(line)

    callback = lc.llama_log_callback(log)
    _LOG_CALLBACKS.append(callback)
    lc.llama_log_set(callback, ctypes.c_void_p(0))


_LOG_CALLBACKS: list = []  # ctypes callbacks handed to llama.cpp must outlive it


@dataclass
class LlamaCache:
    """Which llama.cpp sequences hold each row, and how many tokens each row has accepted (KV lives in the context)."""

    epoch: int  # the prefill that made this cache; a later prefill invalidates it
    seqs: list[list[int]]  # per row: its sequence ids, all holding the row's accepted tokens
    lens: list[int]  # per row: accepted tokens in the KV cache
    tree: TreeBuffers | None = None  # the tree of the last verify, until keep()


class LlamaCppBackend:
    def __init__(self, gguf_path: Path, settings: LlamaCppConfig, tokenizer, context_length: int | None = None):
        import llama_cpp as lc

        if not _LOG_CALLBACKS:
            set_llama_log()
        self.lc, self.settings, self.tokenizer, self.gguf_path = lc, settings, tokenizer, gguf_path
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise FileNotFoundError(f"llama.cpp could not load {gguf_path}")
        self.ctx = lc.llama_init_from_model(self.model, self._context_params(settings))
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context with {settings}")
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(settings.n_batch, 0, settings.n_seq_max)
        vocab = lc.llama_model_get_vocab(self.model)
        self.vocab_size = lc.llama_vocab_n_tokens(vocab)
        self.hidden_size = lc.llama_model_n_embd(self.model)
        n_train = lc.llama_model_n_ctx_train(self.model)
        self.context_length = min(context_length or n_train, n_train, settings.n_ctx)
        eos = {lc.llama_vocab_eos(vocab), lc.llama_vocab_eot(vocab)}
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(t for t in eos if t >= 0))
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.epoch = 0
        self.trash_seq = settings.n_seq_max - 1  # holds cells that no row may reuse until the next prefill

    @staticmethod
    def _context_params(s: LlamaCppConfig):
        import llama_cpp as lc

        p = lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = s.n_ctx, s.n_batch, min(s.n_ubatch, s.n_batch), s.n_seq_max
        p.n_threads = p.n_threads_batch = s.n_threads or os.cpu_count() or 1
        p.embeddings = True  # hidden states for the heads, together with the logits
        p.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
        p.kv_unified = True  # tree sequences share the prefix cells of their row
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.type_k = p.type_v = GGML_TYPE[s.kv_type]
        return p

    @classmethod
    def load(cls, config: BaseModelConfig) -> LlamaCppBackend:
        from medusa_core.backends.hf import resolve_source

        gguf_path = Path(resolve_source(config.source)) / config.gguf_file
        if not gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
        cache_root = resolve_repo_path(config.cache_dir or ".cache/models")
        tokenizer = load_gguf_tokenizer(gguf_path, cache_root)
        if config.llamacpp.requantize is not None:
            gguf_path = requantized(gguf_path, config.llamacpp.requantize, cache_root)
        if config.chat_template is not None:
            tokenizer.chat_template = config.chat_template
        if config.torch_threads:  # the heads' torch threads; 1 avoids contending with llama.cpp's own threads
            torch.set_num_threads(config.torch_threads)
        backend = cls(gguf_path, config.llamacpp, tokenizer, config.context_length)
        backend.output_weight  # dequantize now (seconds), not inside the first request
        return backend

    def __del__(self) -> None:
        lc = getattr(self, "lc", None)
        if lc is None:
            return
        if getattr(self, "batch", None) is not None:
            lc.llama_batch_free(self.batch)
        if getattr(self, "ctx", None):
            lc.llama_free(self.ctx)
        if getattr(self, "model", None):
            lc.llama_model_free(self.model)

    @cached_property
    def output_weight(self) -> Tensor:
        """[V, H] fp32 for the heads' shared lm_head, dequantized from the GGUF on first use."""
        return read_output_weight(self.gguf_path)

    def lm_head(self, hidden: Tensor, vocab: int | None = None) -> Tensor:
        return rows_linear(hidden.float(), self.output_weight[:vocab])  # [..., vocab or V]

    def lm_head_rows(self, ids: Tensor) -> Tensor:
        return self.output_weight[ids]  # [..., H]

    def prefill(self, prompts: Sequence[Sequence[int]], cache: LlamaCache | None = None
                ) -> tuple[Forward, LlamaCache]:
        B = len(prompts)
        if cache is None:  # a new batch: the context starts empty
            self.lc.llama_memory_clear(self.mem, False)
            self.epoch += 1
            cache = LlamaCache(self.epoch, [], [])
        self._check(cache)
        used = {s for seqs in cache.seqs for s in seqs}
        free = [s for s in range(self.trash_seq) if s not in used]
        if B > len(free):
            raise ValueError(f"{B} more requests need more than base_model.llamacpp.n_seq_max="
                             f"{self.settings.n_seq_max} sequences ({len(free)} free, one reserved)")
        seq = free[:B]
        cache = LlamaCache(cache.epoch, cache.seqs + [[s] for s in seq], cache.lens + [len(p) for p in prompts])
        # All but each prompt's last token: no outputs, so no lm_head over the prompt.
        body = [(list(p[:-1]), seq[b]) for b, p in enumerate(prompts)]
        self.lc.llama_set_embeddings(self.ctx, False)
        entries = [(t, pos, (b,)) for toks, b in body for pos, t in enumerate(toks)]
        for start in range(0, len(entries), self.settings.n_batch):
            self._decode(entries[start : start + self.settings.n_batch], outputs=False)
        self.lc.llama_set_embeddings(self.ctx, True)
        logits, hidden = self._decode([(p[-1], len(p) - 1, (seq[b],)) for b, p in enumerate(prompts)], outputs=True)
        return Forward(logits[:, None], hidden[:, None]), cache  # [B, 1, V], [B, 1, H]

    def verify(self, cache: LlamaCache, tokens: Tensor, tree: TreeBuffers) -> Forward:
        self._check(cache)
        B, T = tokens.shape
        P = tree.leaf_nodes.shape[0]
        self._grow_seqs(cache, P)
        # [P, T] leaf path p passes through node t (a sum: padding repeats node 0 with valid=False)
        on_path = torch.zeros(P, T, dtype=torch.long).scatter_add_(1, tree.leaf_nodes.cpu(),
                                                                   tree.leaf_valid.long().cpu()) > 0
        node_leaves = [on_path[:, t].nonzero().flatten().tolist() for t in range(T)]
        depth = tree.depth.tolist()
        toks = tokens.tolist()
        entries = [(toks[b][t], cache.lens[b] + depth[t], tuple(cache.seqs[b][p] for p in node_leaves[t]))
                   for b in range(B) for t in range(T)]  # row-major: nodes sorted by depth within a row
        if len(entries) > self.settings.n_batch:
            raise ValueError(f"{B} rows x {T} tree nodes exceed base_model.llamacpp.n_batch={self.settings.n_batch}")
        logits, hidden = self._decode(entries, outputs=True)
        cache.tree = tree
        return Forward(logits.view(B, T, -1), hidden.view(B, T, -1))

    def keep(self, cache: LlamaCache, nodes: Tensor, keep_len: Tensor) -> None:
        self._check(cache)
        assert cache.tree is not None, "keep() must follow verify()"
        leaf_nodes, leaf_valid = cache.tree.leaf_nodes.cpu(), cache.tree.leaf_valid.cpu()
        rm, cp = self.lc.llama_memory_seq_rm, self.lc.llama_memory_seq_cp
        for b, n in enumerate(keep_len.tolist()):
            last = int(nodes[b, n - 1])
            # Any leaf path through the last kept node holds the whole kept path.
            leaf = int(((leaf_nodes[:, n - 1] == last) & leaf_valid[:, n - 1]).nonzero()[0])
            src, start = cache.seqs[b][leaf], cache.lens[b]
            for s in cache.seqs[b]:
                cp(self.mem, s, self.trash_seq, start + 1, -1)  # rejected nodes' cells stay taken (see module doc)
                if s != src:
                    rm(self.mem, s, start, -1)
            rm(self.mem, src, start + n, -1)
            for s in cache.seqs[b]:
                if s != src:
                    cp(self.mem, src, s, start, start + n)
            cache.lens[b] += n
        cache.tree = None

    def select(self, cache: LlamaCache, rows: Tensor) -> LlamaCache:
        self._check(cache)
        kept = rows.tolist()
        for b in set(range(len(cache.seqs))) - set(kept):
            self.lc.llama_memory_seq_cp(self.mem, cache.seqs[b][0], self.trash_seq, -1, -1)
            for s in cache.seqs[b]:
                self.lc.llama_memory_seq_rm(self.mem, s, -1, -1)
        return LlamaCache(cache.epoch, [cache.seqs[b] for b in kept], [cache.lens[b] for b in kept])

    def _check(self, cache: LlamaCache) -> None:
        if cache.epoch != self.epoch:
            raise RuntimeError("this llama.cpp cache belongs to an earlier batch: a newer prefill cleared the context")

    def _grow_seqs(self, cache: LlamaCache, P: int) -> None:
        """Give every row at least P sequences, each a copy of the row's accepted tokens."""
        used = {s for seqs in cache.seqs for s in seqs}
        free = [s for s in range(self.trash_seq) if s not in used]
        need = sum(max(0, P - len(seqs)) for seqs in cache.seqs)
        if need > len(free):
            raise ValueError(f"{len(cache.seqs)} rows x {P} tree leaves need more than base_model.llamacpp."
                             f"n_seq_max={self.settings.n_seq_max} sequences; use a smaller tree or batch")
        for seqs in cache.seqs:
            while len(seqs) < P:
                s = free.pop(0)
                self.lc.llama_memory_seq_cp(self.mem, seqs[0], s, -1, -1)
                seqs.append(s)

    def _decode(self, entries: list[tuple[int, int, tuple[int, ...]]], outputs: bool) -> tuple[Tensor, Tensor]:
        """One llama_decode of (token, position, sequence ids) entries -> logits [N, V], hidden [N, H] if outputs."""
        batch, n = self.batch, len(entries)
        for i, (tok, pos, seqs) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, len(seqs), int(outputs)
            row = batch.seq_id[i]
            for j, s in enumerate(seqs):
                row[j] = s
        batch.n_tokens = n
        rc = self.lc.llama_decode(self.ctx, batch)
        if rc == 1 and self.lc.llama_memory_seq_pos_max(self.mem, self.trash_seq) >= 0:
            # Out of cells: give the rejected nodes' cells back. Later tokens may then sit at lower cell indices
            # than earlier ones, so this batch's outputs are equal to plain decoding only up to near-ties.
            warnings.warn(f"llama.cpp KV cache full (n_ctx={self.settings.n_ctx}): reusing rejected tree cells; "
                          f"raise base_model.llamacpp.n_ctx to keep Medusa == plain decoding bit for bit")
            self.lc.llama_memory_seq_rm(self.mem, self.trash_seq, -1, -1)
            rc = self.lc.llama_decode(self.ctx, batch)
        if rc == 1:
            raise RuntimeError(f"llama.cpp KV cache full: base_model.llamacpp.n_ctx={self.settings.n_ctx} cells "
                               f"cannot hold this batch's prompts, outputs and tree")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc}")
        if not outputs:
            return torch.empty(0), torch.empty(0)
        logits = np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(n, self.vocab_size))
        hidden = np.ctypeslib.as_array(self.lc.llama_get_embeddings(self.ctx), shape=(n, self.hidden_size))
        return torch.from_numpy(logits.copy()), torch.from_numpy(hidden.copy())


def read_output_weight(gguf_path: Path) -> Tensor:
    """The output projection [V, H] in fp32, dequantized from the GGUF (tied models: the token embedding)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors["token_embd.weight"]
    w = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy [V, H]
    return torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy of the memory-mapped file


def requantized(src: Path, file_type: str, cache_root: Path) -> Path:
    """`src` re-encoded as `file_type` by llama.cpp's quantizer (tensors dequantized first), made once into
    cache_root/<stem>.<file_type>.gguf (~2 s for the embedded model)."""
    from medusa_core.convert import quantize

    target = cache_root / f"{src.stem}.{file_type}.gguf"
    if not target.is_file():
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.stem}.tmp{os.getpid()}.gguf")
        quantize(src, tmp, file_type, allow_requantize=True)
        os.replace(tmp, target)  # atomic: replicas starting together see a whole file or none
    return target


def load_gguf_tokenizer(gguf_path: Path, cache_root: Path):
    """The transformers tokenizer stored in a GGUF file, converted once into cache_root/<stem>.tokenizer."""
    from transformers import AutoTokenizer

    target = cache_root / f"{gguf_path.stem}.tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)  # atomic: a concurrent loader sees a whole folder or none
    return tokenizer
