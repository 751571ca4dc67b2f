"""The shipped heads for the embedded model: they load, the embedded config uses them, and they are lossless and useful."""
import json

from conftest import PROMPTS
from equivalence import run_decode
from medusa_core.config import DEFAULT_CONFIG, REPO_ROOT, load_config
from medusa_core.heads import load_heads

HEADS = REPO_ROOT / "heads" / "smollm2-135m-instruct"


def test_shipped_heads_load_in_the_published_layout():
    config = json.loads((HEADS / "config.json").read_text())
    assert config["shared_lm_head"] is True  # version 2: ResBlocks only, small enough to commit
    heads = load_heads(HEADS, hidden=576, vocab=49152)
    assert heads.num_heads == config["medusa_num_heads"] >= 4 and heads.lm_head is None
    assert heads.weight.abs().sum() > 0  # trained, not the zero (identity) initialisation
    assert config["root_conditioned"] is True and heads.root is not None and heads.root.abs().sum() > 0
    assert (HEADS / "README.md").read_text().count("| 1 (t+2) |") == 1  # the model card reports accuracy


def test_embedded_config_uses_the_shipped_heads_and_a_fitting_tree():
    config = load_config(DEFAULT_CONFIG)
    assert config.heads.source is not None and config.heads.source.path == "heads/smollm2-135m-instruct"
    depth = max(len(p) for p in config.tree.resolved_paths())
    assert depth <= load_heads(HEADS, 576, 49152).num_heads


def test_greedy_medusa_equals_plain_with_shipped_heads(embedded_generator):
    gen = embedded_generator
    chat = [gen.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS[:3]]
    prompts = [tuple(gen.encode(p)) for p in PROMPTS] + [tuple(c) for c in chat]
    plain, plain_steps = run_decode(gen.backend, None, gen.tree, prompts, 48, speculate=False)
    medusa, medusa_steps = run_decode(gen.backend, gen.drafter, gen.tree, prompts, 48)
    assert medusa == plain
    # Trained heads must actually be accepted sometimes (random heads almost never are): fewer decode steps.
    assert medusa_steps < 0.95 * plain_steps, (medusa_steps, plain_steps)
