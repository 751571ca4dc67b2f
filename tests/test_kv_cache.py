"""KV compaction: after accepting a path, the cache equals the cache built by decoding that path token by token."""
import torch

from medusa_core.tree import build_tree_buffers

TREE = build_tree_buffers([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], top_k=10)


def test_keep_equals_sequential(tiny_backend):
    be = tiny_backend
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]  # uneven lengths: row 1 has stale slots in the shared axis
    _, cache = be.prefill(prompts)
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25, 26]])  # [B, T]
    out = be.verify(cache, tokens, TREE)
    nodes = torch.tensor([[0, 1, 3, 6], [0, 2, 5, 0]])
    keep_len = torch.tensor([4, 2])  # row 0 keeps root,a,aa,aaa; row 1 keeps root,b
    be.keep(cache, nodes, keep_len)
    assert cache.lens.tolist() == [11, 5]

    for b in range(2):
        kept = tokens[b, nodes[b, : keep_len[b]]].tolist()
        ref_fwd, ref = be.prefill([prompts[b] + kept])
        n = len(prompts[b]) + len(kept)
        for layer, ref_layer in zip(cache.kv.layers, ref.kv.layers):
            torch.testing.assert_close(layer.keys[b, :, :n], ref_layer.keys[0, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.values[b, :, :n], ref_layer.values[0, :, :n], atol=1e-5, rtol=1e-5)
        # the tree pass's logits at the last kept node equal the sequential pass's last logits
        last = nodes[b, keep_len[b] - 1]
        torch.testing.assert_close(out.logits[b, last], ref_fwd.logits[0, 0], atol=5e-5, rtol=1e-5)


def test_select_drops_rows(tiny_backend):
    be = tiny_backend
    _, cache = be.prefill([[1, 2, 3], [4, 5, 6, 7, 8], [9]])
    before = cache.kv.layers[0].keys[2, :, :1].clone()
    cache = be.select(cache, torch.tensor([0, 2]))
    assert cache.lens.tolist() == [3, 1]
    assert cache.kv.layers[0].keys.shape[2] == 3  # cropped to the longest remaining row
    torch.testing.assert_close(cache.kv.layers[0].keys[1, :, :1], before)
