"""Shared fixtures: a tiny random Llama built here and the embedded SmolLM2 model; re-exports the oracle drafter."""
from __future__ import annotations

import os

import pytest
import torch
from medusa_core.oracle import OracleDrafter  # noqa: F401  (tests import it from here)

# Ray token auth on, as users run it (the venv sets it too, .ci/install); a test of the disabled mode says so.
os.environ.setdefault("RAY_AUTH_MODE", "token")
torch.set_num_threads(2)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
    "The quick brown fox",
]


def tiny_llama(seed: int = 0, vocab: int = 256):
    """A 2-layer random Llama (H=64, V=256) in fp32. A wide init keeps logits well separated (few near-ties)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_backend():
    from medusa_core.backends.hf import HFBackend

    return HFBackend(tiny_llama(), tokenizer=None)


@pytest.fixture(scope="session")
def embedded_generator():
    from medusa_core.config import DEFAULT_CONFIG, load_config
    from medusa_core.generator import load_generator

    # The configured tree every step: tests pin the tree they check; test_adaptive.py builds the adaptive policy.
    config = load_config(DEFAULT_CONFIG)
    return load_generator(config.model_copy(update={"tree": config.tree.model_copy(update={"adaptive": None})}))


def pytest_collection_modifyitems(items):
    """Run the tests that use the Ray Serve app last: its cluster lives until the session ends, so nothing else
    shares the two cores with it. Ray tests that start and stop a cluster of their own (test_security.py) go before
    it: `.ci/serve` ends with `ray stop`, which stops every Ray cluster on the machine."""
    items.sort(key=lambda item: (item.get_closest_marker("ray") is not None,
                                 "server" in getattr(item, "fixturenames", ())))


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The real app: `serve run` on serve_config.yaml with a test port, a small queue and short autoscaling delays;
    shared by the service and reliability tests (one Ray cluster start)."""
    from serve_harness import serve_config, start_server

    cfg = serve_config(8123, decoder={
        "max_queued_requests": 4,
        "autoscaling_config": {"upscale_delay_s": 2, "downscale_delay_s": 5, "target_ongoing_requests": 2},
        "graceful_shutdown_timeout_s": 30,
        "health_check_period_s": 2,
        "health_check_timeout_s": 5,
    })
    s = start_server(cfg, tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()
