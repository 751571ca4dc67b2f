"""Shared fixtures: a tiny random Llama built here and the embedded SmolLM2 model; re-exports the oracle drafter."""
from __future__ import annotations

import os

import pytest
import torch
from medusa_core.tools.oracle import OracleDrafter  # noqa: F401  (tests import it from here)

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
def tiny_reference():
    """The tiny Llama built afresh, never patched by our backend: the independent reference."""
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_scorer(tiny_reference):
    from equivalence import hf_scorer

    return hf_scorer(tiny_reference)


@pytest.fixture(scope="session")
def embedded_reference():
    """The embedded model loaded afresh and unpatched (fp32, eager attention): the independent reference."""
    from equivalence import load_hf_reference
    from medusa_core.config import DEFAULT_CONFIG, load_config

    return load_hf_reference(load_config(DEFAULT_CONFIG).base_model)


@pytest.fixture(scope="session")
def embedded_scorer(embedded_reference):
    from equivalence import hf_scorer

    return hf_scorer(embedded_reference)


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
    """The real app: `serve run` on serve_config.yaml with a test port, a small queue, short autoscaling delays and
    the served model config with a fixed tree; shared by the service and reliability tests (one Ray cluster
    start)."""
    from serve_harness import serve_config, start_server

    folder = tmp_path_factory.mktemp("serve")
    cfg = serve_config(8123, config=str(fixed_tree_config(folder)), decoder={
        # Room for every request the replica-kill test has in flight at once (3 streams, 2 prefills, 3 load
        # workers) while the router still probes the replica: a tighter queue refuses some of them `queue_full`.
        "max_queued_requests": 8,
        "autoscaling_config": {"upscale_delay_s": 2, "downscale_delay_s": 5, "target_ongoing_requests": 2},
        "health_check_period_s": 2,
        "health_check_timeout_s": 5,
    })
    s = start_server(cfg, folder)
    yield s
    s.stop()


def fixed_tree_config(folder):
    """The served model config with the adaptive policy off, so its chain is verified every step: the HTTP tests'
    equality checks (batched == alone, CLI == HTTP, the soak) then compare Medusa with speculation on, which the
    adaptive policy on this CPU would mostly switch off."""
    import yaml
    from serve_harness import REPO, SERVED_CONFIG

    config = yaml.safe_load((REPO / SERVED_CONFIG).read_text())
    config["tree"]["adaptive"] = None
    path = folder / "model_fixed_tree.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
