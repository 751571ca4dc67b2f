"""GGUF files: a Hugging Face Llama folder -> GGUF (f32 or f16) with the `gguf` package, llama.cpp quantization,
and the routing of llama.cpp's log (the quantizer's progress bar reads it; the backend mutes its load log).

`convert(folder, out, outtype, quant)` writes a GGUF file for the llama.cpp backend; Medusa heads stay in their own
file (they run in torch). Tensors are streamed one at a time, so memory holds one weight, not the model.

Follows llama.cpp's `convert_hf_to_gguf.py` for the Llama architecture: the same tensor names (through gguf's
tensor name map), q/k rows permuted from the HF rotate-half layout to llama.cpp's interleaved RoPE, 1-D tensors kept
f32 in f16 files, and the tokenizer stored as a SentencePiece vocabulary (`tokenizer.model`, model "llama") or a
byte-level BPE one (`tokenizer.json`, model "gpt2", pre-tokenizer named from its pre_tokenizer config).
Quantization (Q8_0, Q4_K_M, ...) is llama.cpp's own `llama_model_quantize` through llama-cpp-python.

Differences from convert_hf_to_gguf.py: Llama only; no vocab-hash detection of the pre-tokenizer (two known shapes,
otherwise an error asks for --tokenizer-pre); no LoRA, MoE or rope-scaling variants.
"""
from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medusa_core.files import written_whole

QUANT_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_S": 14,
               "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}
FILE_TYPES = {**QUANT_TYPES, "F16": 1, "BF16": 32}  # what quantize() may write: F16/BF16 re-encode a quantized file
OUT_TYPES = ("f32", "f16")
# pre_tokenizer shapes in tokenizer.json -> llama.cpp's pre-tokenizer name
KNOWN_PRE = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
}


class ConversionError(ValueError):
    """A folder that cannot be converted; the message names the missing file or unsupported setting."""


@dataclass
class Vocab:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    scores: list[float] | None = None  # SentencePiece only
    merges: list[str] = field(default_factory=list)  # BPE only
    pre: str | None = None  # BPE only
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    chat_template: str | None = None


def convert(folder: str | Path, out: str | Path, outtype: str = "f16", quant: str | None = None,
            threads: int | None = None, tokenizer_pre: str | None = None) -> Path:
    """Write `out`: an f32/f16 GGUF, or with `quant` that file quantized (the float file is an intermediate, removed).
    `out` appears whole or not at all."""
    folder, out = Path(folder), Path(out)
    if quant is not None and quant not in QUANT_TYPES:
        raise ConversionError(f"unknown quantization {quant!r}; known: {', '.join(QUANT_TYPES)}")
    with written_whole(out) as tmp:
        if quant is None:
            write_gguf(folder, tmp, outtype, tokenizer_pre)
        else:
            float_path = tmp.with_name(f"{tmp.stem}.{outtype}.gguf")  # an intermediate: `out` is what was asked for
            try:
                write_gguf(folder, float_path, outtype, tokenizer_pre)
                quantize(float_path, tmp, quant, threads)
            finally:
                float_path.unlink(missing_ok=True)
    return out


def write_gguf(folder: Path, out: Path, outtype: str, tokenizer_pre: str | None = None) -> Path:
    import gguf
    from tqdm import tqdm

    if outtype not in OUT_TYPES:
        raise ConversionError(f"unknown outtype {outtype!r}; known: {', '.join(OUT_TYPES)}")
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "llama":
        raise ConversionError(f"{folder}: model_type {config.get('model_type')!r} is not llama")
    vocab = read_vocab(folder, tokenizer_pre)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, "llama")
    _add_hparams(writer, config, folder.name, outtype)
    _add_vocab(writer, vocab)
    weights = _WeightFiles(folder)
    names = _gguf_names(weights.names(), config["num_hidden_layers"])
    for hf_name, name in names.items():
        shape, dtype = weights.shape(hf_name), _out_dtype(outtype, len(weights.shape(hf_name)))
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, name in tqdm(names.items(), desc=f"writing {out.name}", unit="tensor"):
        w = _prepared(hf_name, weights.load(hf_name), config)
        writer.write_tensor_data(w.astype(_out_dtype(outtype, w.ndim)))
    writer.close()
    return out


def _add_hparams(writer, config: dict, name: str, outtype: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    ftype = gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(ftype)
    if config.get("rope_scaling"):
        raise ConversionError(f"rope_scaling {config['rope_scaling']} is not supported by this converter")


def _add_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for key, token_id in vocab.special.items():
        getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _out_dtype(outtype: str, ndim: int):
    return np.float16 if outtype == "f16" and ndim > 1 else np.float32  # norms stay f32, as llama.cpp does


def _gguf_names(hf_names: list[str], n_layers: int) -> dict[str, str]:
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    names = {}
    for hf in hf_names:
        if hf.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp
        name = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConversionError(f"no GGUF name for tensor {hf!r}")
        names[hf] = name
    return names


def _prepared(hf_name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """Permute q/k rows from HF's rotate-half RoPE layout to llama.cpp's interleaved one."""
    heads = config["num_attention_heads"]
    if hf_name.endswith("q_proj.weight"):
        return _permute(w, heads)
    if hf_name.endswith("k_proj.weight"):
        return _permute(w, config.get("num_key_value_heads") or heads)
    return w


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _WeightFiles:
    """The safetensors (or .bin) files of a folder, read one tensor at a time."""

    def __init__(self, folder: Path) -> None:
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
        if not files:
            raise ConversionError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
        self.where: dict[str, Path] = {}
        self._bins: dict[Path, dict] = {}
        for f in files:
            for name in self._open(f).keys():
                self.where[name] = f

    def _open(self, f: Path):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            return safe_open(str(f), framework="pt")
        if f not in self._bins:
            import torch

            self._bins[f] = torch.load(f, map_location="cpu", weights_only=True)
        return self._bins[f]

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        f = self.where[name]
        if f.suffix == ".safetensors":
            return tuple(self._open(f).get_slice(name).get_shape())
        return tuple(self._open(f)[name].shape)

    def load(self, name: str) -> np.ndarray:
        f = self.where[name]
        t = self._open(f).get_tensor(name) if f.suffix == ".safetensors" else self._open(f)[name]
        return t.float().numpy()


def read_vocab(folder: Path, tokenizer_pre: str | None = None) -> Vocab:
    """SentencePiece (tokenizer.model) if present, else byte-level BPE (tokenizer.json)."""
    tok_config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if (folder / "tokenizer.model").is_file():
        vocab = _spm_vocab(folder / "tokenizer.model")
    elif (folder / "tokenizer.json").is_file():
        vocab = _bpe_vocab(_read_json(folder / "tokenizer.json"), tokenizer_pre)
    else:
        raise ConversionError(f"{folder}: no tokenizer.model (SentencePiece) or tokenizer.json (BPE)")
    _add_special(vocab, folder, tok_config)
    return vocab


def _spm_vocab(path: Path) -> Vocab:
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                else gguf.TokenType.NORMAL)
        types.append(int(kind))
    special = {k: v for k, v in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())) if v >= 0}
    return Vocab("llama", tokens, types, scores=scores, special=special, add_bos=True)


def _bpe_vocab(tokenizer: dict, tokenizer_pre: str | None) -> Vocab:
    import gguf

    model = tokenizer["model"]
    if model.get("type") != "BPE":
        raise ConversionError(f"tokenizer.json model type {model.get('type')!r} is not BPE")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tokenizer.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [int(gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.CONTROL if added.get(i, {}).get("special")
                 else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab("gpt2", tokens, types, merges=merges, pre=tokenizer_pre or _pre_name(tokenizer))


def _pre_name(tokenizer: dict) -> str:
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    shape = tuple((s.get("type"), bool(s.get("individual_digits", s.get("use_regex", False)))) for s in steps)
    if shape not in KNOWN_PRE:
        raise ConversionError(f"unknown BPE pre-tokenizer {shape}; pass --tokenizer-pre with llama.cpp's name for it")
    return KNOWN_PRE[shape]


def _add_special(vocab: Vocab, folder: Path, tok_config: dict) -> None:
    """bos/eos/unk/pad ids, add_bos and the chat template from tokenizer_config.json and generation_config.json."""
    index = {t: i for i, t in enumerate(vocab.tokens)}
    for key in ("bos", "eos", "unk", "pad"):
        tok = tok_config.get(f"{key}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok is not None and tok in index:
            vocab.special[key] = index[tok]
    if "add_bos_token" in tok_config:
        vocab.add_bos = bool(tok_config["add_bos_token"])
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    vocab.chat_template = template if isinstance(template, str) else None


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None, allow_requantize: bool = False) -> Path:
    """llama.cpp's quantizer on a float GGUF (or, with allow_requantize, a quantized one: its tensors are
    dequantized first); a progress bar follows its per-tensor log lines."""
    import llama_cpp as lc
    from tqdm import tqdm

    params = lc.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[quant]
    params.nthread = threads or 0  # 0: all cores
    params.allow_requantize = allow_requantize
    bar = tqdm(desc=f"quantizing to {quant}", unit="tensor")
    set_llama_log(lambda text: _quant_progress(text, bar))
    try:
        rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        set_llama_log()
        bar.close()
    if rc != 0:
        raise ConversionError(f"llama_model_quantize({src} -> {dst}, {quant}) failed with status {rc}")
    return dst


_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def _quant_progress(text: str, bar) -> None:
    m = _TENSOR_LINE.search(text)
    if m:
        bar.total = int(m.group(2))
        bar.update(int(m.group(1)) - bar.n)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"missing {path}")
    return json.loads(path.read_text())


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


def route_llama_log_once() -> None:
    """`set_llama_log()` unless a log route is already set in this process (a quantizer's sets its own)."""
    if not _LOG_CALLBACKS:
        set_llama_log()
