"""llama.cpp backend: a GGUF base model through llama-cpp-python's low-level API, a Medusa chain in one llama_decode.

The context returns logits and the final-norm hidden state of every output token (`embeddings=True`, no pooling);
the Medusa heads run in torch on that hidden state, with the output matrix read from the GGUF file.

KV layout: one llama.cpp sequence per batch row, each in its own KV stream (`kv_unified=False`) of
`context_length + MAX_CHAIN_NODES` cells, so a row's attention reads only its own cells and a request that fits the
context window can never run out of KV space mid-request: the only limit is `n_seq_max` rows, and the decode loop
admits no more (admission, not failure). A step appends the row's chain of candidates (root first) at positions
len_b .. len_b + T - 1 and then removes the rejected tail with one `seq_rm`, so a row's cells stay contiguous and in
position order, exactly as in plain decoding. Branching trees would need one sequence per leaf path sharing prefix
cells, which only a unified cache allows (every token then scans every row's cells); this backend verifies chains
(trees with one leaf path), which on a CPU are the trees that pay (benchmarks/README.md).

llama.cpp computes one ubatch over consecutive sequence ids only, so rows hold sequences 0..B-1 in batch order; when
a row leaves, the rows after it move down one stream (a copy of their cells, once per finished request).

Exactness: flash attention on (each query row alone; off, the KQ matmul tiles by batch shape) and compute passes
(n_ubatch) under 64 tokens, where llama.cpp's CPU matmul switches kernel. With a Q4 file as shipped a chain pass then
reproduces the sequential pass bit for bit. Q8_0/F16/BF16 weights take llama.cpp's tinyBLAS kernel for two or more
rows and its dot product for one: results of two or more rows do not depend on how many, but differ from one row's in
the last bits (BF16 most), so a one-row step and a chain or batch step can part at a near-tie (README).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from medusa_core.backends import Forward
from medusa_core.backends.gguf_files import quantize, route_llama_log_once
from medusa_core.backends.kernels import rows_linear
from medusa_core.config import MAX_CHAIN_NODES, BaseModelConfig, LlamaCppConfig, models_cache
from medusa_core.files import written_whole
from medusa_core.tree import TreeBuffers

GGML_TYPE = {"f32": 0, "f16": 1, "bf16": 30}
@dataclass
class LlamaCache:
    """Row b's KV is llama.cpp sequence b (its own stream); lens[b] accepted tokens are in it."""

    epoch: int  # the prefill that made this cache; a later prefill invalidates it
    lens: list[int]


class LlamaCppBackend:
    def __init__(self, gguf_path: Path, settings: LlamaCppConfig, tokenizer, context_length: int | None = None):
        import llama_cpp as lc

        route_llama_log_once()
        self.lc, self.settings, self.tokenizer, self.gguf_path = lc, settings, tokenizer, gguf_path
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        # No extra weight buffers (AMX, repacked layouts): llama.cpp's AMX matmul crashes on Sapphire Rapids
        # (ggml-org/llama.cpp#20824), and the plain kernels give the same sums on every x86 machine (docs/design.md).
        params.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), params)
        if not self.model:
            raise FileNotFoundError(f"llama.cpp could not load {gguf_path}")
        n_train = lc.llama_model_n_ctx_train(self.model)
        self.context_length = min(context_length or n_train, n_train)
        # llama.cpp pads each stream to a multiple of 256 cells
        self.row_cells = -(-(self.context_length + MAX_CHAIN_NODES) // 256) * 256
        self.max_rows = settings.n_seq_max
        self.ctx = lc.llama_init_from_model(self.model, self._context_params(settings, self.row_cells))
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context with {settings}")
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(settings.n_batch, 0, 1)
        vocab = lc.llama_model_get_vocab(self.model)
        self.vocab_size = lc.llama_vocab_n_tokens(vocab)
        self.hidden_size = lc.llama_model_n_embd(self.model)
        eos = {lc.llama_vocab_eos(vocab), lc.llama_vocab_eot(vocab)}
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(t for t in eos if t >= 0))
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.epoch = 0
        self.decode_s = 0.0  # seconds spent inside llama_decode so far (benchmarks: our overhead beside it)

    @staticmethod
    def _context_params(s: LlamaCppConfig, row_cells: int):
        import llama_cpp as lc

        p = lc.llama_context_default_params()
        p.n_seq_max, p.n_ctx = s.n_seq_max, s.n_seq_max * row_cells
        p.n_batch, p.n_ubatch = s.n_batch, min(s.n_ubatch, s.n_batch)
        p.n_threads = p.n_threads_batch = s.n_threads or os.cpu_count() or 1
        p.embeddings = True  # hidden states for the heads, together with the logits
        p.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
        p.kv_unified = False  # a KV stream per row: attention reads only the row's own cells
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.type_k = p.type_v = GGML_TYPE[s.kv_type]
        return p

    @classmethod
    def load(cls, config: BaseModelConfig) -> LlamaCppBackend:
        from medusa_core.backends.hf import resolve_source

        gguf_path = Path(resolve_source(config.source)) / config.gguf_file
        if not gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
        cache_root = models_cache(config)
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
        if cache is None:  # a new batch: the context starts empty
            self.lc.llama_memory_clear(self.mem, False)
            self.epoch += 1
            cache = LlamaCache(self.epoch, [])
        self._check(cache)
        first = len(cache.lens)
        if first + len(prompts) > self.max_rows:
            raise ValueError(f"{first} + {len(prompts)} rows exceed base_model.llamacpp.n_seq_max={self.max_rows}")
        if (longest := max(len(p) for p in prompts)) > self.context_length:
            raise ValueError(f"a prompt of {longest} tokens exceeds the context window of {self.context_length}")
        fwd = self._read([(first + b, 0, p) for b, p in enumerate(prompts)])
        return fwd, LlamaCache(cache.epoch, cache.lens + [len(p) for p in prompts])

    def extend(self, cache: LlamaCache, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> Forward:
        """RowExtending.extend: each row is its own sequence, so only its own cells grow."""
        self._check(cache)
        if any(cache.lens[b] + len(t) > self.context_length for b, t in zip(rows, tokens)):
            raise ValueError(f"extending a row past the context window of {self.context_length} tokens")
        fwd = self._read([(b, cache.lens[b], t) for b, t in zip(rows, tokens)])
        for b, t in zip(rows, tokens):
            cache.lens[b] += len(t)
        return fwd

    def _read(self, parts: list[tuple[int, int, Sequence[int]]]) -> Forward:
        """Decode each (sequence, first position, tokens) part; outputs at each part's last token only."""
        # All but each part's last token, without outputs (no lm_head over the prompt); one sequence at a time, so that
        # its compute passes are cut as when it is decoded alone (their shape moves the float sums).
        self.lc.llama_set_embeddings(self.ctx, False)
        for seq, pos, tokens in parts:
            body = [(t, pos + i, seq) for i, t in enumerate(tokens[:-1])]
            for start in range(0, len(body), self.settings.n_batch):
                self._decode(body[start : start + self.settings.n_batch], outputs=False)
        self.lc.llama_set_embeddings(self.ctx, True)
        logits, hidden = self._decode([(t[-1], pos + len(t) - 1, seq) for seq, pos, t in parts], outputs=True)
        return Forward(logits[:, None], hidden[:, None])  # [B, 1, V], [B, 1, H]

    def verify(self, cache: LlamaCache, tokens: Tensor, tree: TreeBuffers) -> Forward:
        self._check(cache)
        if tree.leaf_nodes.shape[0] != 1:
            raise ValueError("the llama.cpp backend verifies chains (trees with one leaf path) only")
        B, T = tokens.shape
        if B * T > self.settings.n_batch:
            raise ValueError(f"{B} rows x {T} tree nodes exceed base_model.llamacpp.n_batch={self.settings.n_batch}")
        if T > MAX_CHAIN_NODES:
            raise ValueError(f"a chain of {T} nodes exceeds the {MAX_CHAIN_NODES} KV cells a row keeps for it")
        toks = tokens.tolist()
        entries = [(toks[b][t], cache.lens[b] + t, b) for b in range(B) for t in range(T)]  # a chain: depth t = node t
        logits, hidden = self._decode(entries, outputs=True)
        return Forward(logits.view(B, T, -1), hidden.view(B, T, -1))

    def keep(self, cache: LlamaCache, nodes: Tensor, keep_len: Tensor) -> None:
        """A chain keeps nodes 0..n-1, the front of what verify appended: drop the rest of the row's cells."""
        self._check(cache)
        for b, n in enumerate(keep_len.tolist()):
            self.lc.llama_memory_seq_rm(self.mem, b, cache.lens[b] + n, -1)
            cache.lens[b] += n

    def select(self, cache: LlamaCache, rows: Tensor) -> LlamaCache:
        """Keep these rows; the kept rows move down to sequences 0..len(rows)-1 (rows ascend, so a stream is read
        before it is overwritten; llama.cpp copies the cells at the next decode, in this order)."""
        self._check(cache)
        kept = rows.tolist()
        assert kept == sorted(kept), "select() keeps rows in batch order"
        rm, cp = self.lc.llama_memory_seq_rm, self.lc.llama_memory_seq_cp
        for b in sorted(set(range(len(cache.lens))) - set(kept)):
            rm(self.mem, b, -1, -1)
        for i, b in enumerate(kept):
            if b != i:
                cp(self.mem, b, i, -1, -1)
                rm(self.mem, b, -1, -1)
        return LlamaCache(cache.epoch, [cache.lens[b] for b in kept])

    def sequence_hidden(self, ids: Sequence[int]) -> Tensor:
        """Final-norm hidden states [S, H] of every position of one sequence, for training caches of the states this
        backend serves with. Clears the context: a running batch's cache is invalid afterwards."""
        if len(ids) > self.context_length:
            raise ValueError(f"a sequence of {len(ids)} tokens exceeds the context window of {self.context_length}")
        self.lc.llama_memory_clear(self.mem, False)
        self.epoch += 1
        step = self.settings.n_batch
        parts = [self._decode([(t, start + i, 0) for i, t in enumerate(ids[start : start + step])], outputs=True)[1]
                 for start in range(0, len(ids), step)]
        self.lc.llama_memory_clear(self.mem, False)
        return torch.cat(parts)

    def _check(self, cache: LlamaCache) -> None:
        if cache.epoch != self.epoch:
            raise RuntimeError("this llama.cpp cache belongs to an earlier batch: a newer prefill cleared the context")

    def _decode(self, entries: list[tuple[int, int, int]], outputs: bool) -> tuple[Tensor, Tensor]:
        """One llama_decode of (token, position, sequence id) entries -> logits [N, V], hidden [N, H] if outputs."""
        batch, n = self.batch, len(entries)
        for i, (tok, pos, seq) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, outputs
            batch.seq_id[i][0] = seq
        batch.n_tokens = n
        start = time.perf_counter()
        rc = self.lc.llama_decode(self.ctx, batch)
        self.decode_s += time.perf_counter() - start
        if rc != 0:  # rows fit their streams by construction: any failure is a bug or a broken context
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
    cache_root/<stem>.<file_type>.gguf."""
    target = cache_root / f"{src.stem}.{file_type}.gguf"
    if not target.is_file():
        with written_whole(target) as tmp:  # replicas starting together see a whole file or none
            quantize(src, tmp, file_type, allow_requantize=True)
    return target


def load_gguf_tokenizer(gguf_path: Path, cache_root: Path):
    """The transformers tokenizer stored in a GGUF file, converted once into cache_root/<stem>.tokenizer."""
    from transformers import AutoTokenizer

    target = cache_root / f"{gguf_path.stem}.tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with written_whole(target) as tmp:
        tokenizer.save_pretrained(tmp)
    return tokenizer
