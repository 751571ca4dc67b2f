"""`export-onnx`: the shipped heads as an ONNX graph, run in onnxruntime, give the logits the served heads give in
torch (the backend's own lm_head, root and previous-token rows), within 1e-4, at any batch size."""
import numpy as np
import onnxruntime
import pytest
import torch

from medusa_core.__main__ import main
from medusa_core.config import REPO_ROOT, load_config

pytest.importorskip("llama_cpp")
SERVED = REPO_ROOT / "configs" / "smollm2-135m-llamacpp.yaml"


def test_exported_shipped_heads_match_the_served_heads(tmp_path, capsys):
    from medusa_core.backends import load_backend
    from medusa_core.generator import load_drafter

    out = tmp_path / "heads.onnx"
    assert main(["export-onnx", "--config", str(SERVED), "--out", str(out)]) == 0
    assert "inputs hidden, root_ids, prev_ids -> logits" in capsys.readouterr().out  # sequential heads
    config = load_config(SERVED)
    backend = load_backend(config.base_model)
    heads = load_drafter(config.heads, backend.hidden_size, backend.vocab_size, torch.float32, "cpu")
    session = onnxruntime.InferenceSession(str(out))
    rng = torch.Generator().manual_seed(0)
    for batch in (1, 5):  # the batch dimension is dynamic
        hidden = torch.randn(batch, backend.hidden_size, generator=rng) * 3
        roots = torch.randint(0, backend.vocab_size, (batch,), generator=rng)
        prev = torch.randint(0, backend.vocab_size, (batch, heads.num_heads), generator=rng)
        want = heads.logits(hidden, backend.lm_head_rows(roots), backend.lm_head,
                            prev_rows=backend.lm_head_rows(prev.flatten()).view(batch, heads.num_heads, -1)).numpy()
        got = session.run(["logits"], {"hidden": hidden.numpy(), "root_ids": roots.numpy(),
                                       "prev_ids": prev.numpy()})[0]
        assert got.shape == want.shape == (batch, heads.num_heads, config.heads.head_vocab)
        assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
        assert (got.argmax(-1) == want.argmax(-1)).all()
