"""RowsLinear: the CPU backend's faster product for few rows computes nn.Linear's result and keeps its parameters."""
import pytest
import torch
from torch import nn

from medusa_core.backends.hf import ROWS_LINEAR_MAX, HFBackend, RowsLinear, rows_linear
from tests.conftest import tiny_llama


@pytest.mark.parametrize("rows", [1, 2, 3, ROWS_LINEAR_MAX, ROWS_LINEAR_MAX + 1, 40])
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
    assert linears and all(type(m) is RowsLinear for m in linears)
    for name, p in backend.model.named_parameters():
        assert torch.equal(p, reference[name])
    assert backend.model.lm_head.weight is backend.model.model.embed_tokens.weight
    with torch.inference_mode():
        torch.testing.assert_close(backend.model(ids).logits, before, atol=1e-5, rtol=1e-5)
