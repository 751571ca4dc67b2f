"""The CPU backend's kernels (CpuLinear, gqa_sdpa) compute what stock transformers computes, parameters untouched."""
import pytest
import torch
from torch import nn

from medusa_core.backends.hf import CpuLinear, HFBackend
from medusa_core.backends.kernels import FEW_ROWS, ROWS_PER_THREAD, linear, pack, rows_linear
from medusa_core.tree import build_tree_buffers
from tests.conftest import tiny_llama


@pytest.mark.parametrize("rows", [1, 2, 3, ROWS_PER_THREAD, 2 * ROWS_PER_THREAD, 2 * ROWS_PER_THREAD + 1, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_rows_linear_equals_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(rows, 64, generator=g).t().contiguous().t()  # column-major rows, as a transposed product gives
    x3 = x.reshape(1, rows, 64)  # [B, S, H] as the model passes it
    out = rows_linear(x3, weight, b)
    assert out.shape == (1, rows, 96) and out.is_contiguous()
    torch.testing.assert_close(out, nn.functional.linear(x3, weight, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, FEW_ROWS, FEW_ROWS + 1, 40, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(2, rows, 64, generator=g)  # [B, S, H]
    packed = pack(weight)
    assert packed is not None, "this torch has no oneDNN: the CPU backend would run slower products"
    out = linear(x, weight, b, packed)
    assert out.shape == (2, rows, 96)
    torch.testing.assert_close(out, nn.functional.linear(x, weight, b), atol=1e-5, rtol=1e-5)
    assert pack(weight.double()) is None  # fp32 only: other dtypes keep the unpacked products


def test_cpu_backend_swaps_every_linear_and_keeps_tied_weights():
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.tie_word_embeddings = True  # as SmolLM2: lm_head shares the embedding
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = {name: p.clone() for name, p in model.named_parameters()}
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        before = model(ids).logits
    backend = HFBackend(model, tokenizer=None)
    linears = [m for m in backend.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is CpuLinear and m.packed is not None for m in linears)
    assert not any("packed" in k for k in backend.model.state_dict())  # the packed copies are not saved
    for name, p in backend.model.named_parameters():
        assert torch.equal(p, reference[name])
    assert backend.model.lm_head.weight is backend.model.model.embed_tokens.weight
    with torch.inference_mode():
        torch.testing.assert_close(backend.model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_tree_pass_equals_stock_transformers():
    stock = tiny_llama(seed=3)  # nn.Linear and transformers' SDPA attention
    backend = HFBackend(tiny_llama(seed=3), tokenizer=None)
    assert backend.model.config._attn_implementation == "gqa_sdpa"
    prompt, chain = [5, 17, 42, 9, 77, 3], [11, 12, 13]
    tree = build_tree_buffers([[0], [0, 0], [1], [0, 0, 0]], top_k=10)  # node order: root, a, b, aa, aaa
    tokens = torch.tensor([[chain[0], chain[1], 99, chain[2], 100]])  # [B, T]; b (99) is a sibling off the chain
    first, cache = backend.prefill([prompt])
    out = backend.verify(cache, tokens, tree)
    with torch.inference_mode():
        ref = stock(torch.tensor([prompt + chain + [100]])).logits[0]  # [S, V]
        ref_b = stock(torch.tensor([prompt + chain[:1] + [99]])).logits[0, -1]
    torch.testing.assert_close(first.logits[0, 0], ref[len(prompt) - 1], atol=1e-4, rtol=1e-4)
    for node, pos in [(0, 0), (1, 1), (3, 2), (4, 3)]:  # chain nodes against the sequential pass
        torch.testing.assert_close(out.logits[0, node], ref[len(prompt) + pos], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits[0, 2], ref_b, atol=1e-4, rtol=1e-4)
