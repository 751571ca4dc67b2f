"""The CLI: JSON output of a real generation, and one clear line for each kind of bad input.

One test runs `python -m medusa_core` in a subprocess (the entry point, stdout, exit status); the others call
`medusa_core.__main__.main(argv)` in this process, which skips a Python + torch start (~3 s) per case. In-process, an
exception escaping `main` fails the test by itself, where a subprocess would have printed a traceback.
"""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medusa_core import generator as generator_module
from medusa_core.__main__ import main

REPO = Path(__file__).resolve().parent.parent


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) in this process: (exit status, stdout, stderr). argparse errors exit through SystemExit(2)."""
    threads = torch.get_num_threads()
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)  # a config's torch_threads must not leak into the rest of the session
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def fixed_tree_config(tmp_path_factory) -> Path:
    """The CLI's default config with the adaptive tree off: every step verifies the configured tree, so whether
    Medusa speculates does not depend on step costs timed on this machine (adaptive may choose plain decoding)."""
    text = (REPO / "configs" / "smollm2-135m.yaml").read_text()
    path = tmp_path_factory.mktemp("cli") / "fixed-tree.yaml"
    path.write_text(re.sub(r"\n\s*adaptive: .*", "", text))
    return path


def test_json_output_medusa_equals_plain(fixed_tree_config, capsys):
    args = ["generate", "--config", str(fixed_tree_config), "--prompt", "The capital of France is", "--max-tokens",
            "20", "--ignore-eos", "--json"]
    r = subprocess.run([sys.executable, "-m", "medusa_core", *args, "--mode", "medusa"], check=False,
                       capture_output=True, text=True, cwd=REPO, timeout=300)  # the one subprocess run
    assert r.returncode == 0, r.stderr
    code, stdout, _ = run_main(capsys, *args, "--mode", "plain")
    assert code == 0
    medusa, plain = json.loads(r.stdout), json.loads(stdout)
    assert medusa["token_ids"] == plain["token_ids"]
    stats = medusa["stats"]
    assert stats["generated_tokens"] == 20 and len(medusa["token_ids"]) == 20 and stats["tokens_per_second"] > 0
    # The shipped heads accept on this prompt (19 tokens in 13 steps here): at 1.0 Medusa did not speculate.
    assert stats["mean_accepted_length"] > 1.0 and stats["decode_steps"] < 19, stats
    assert plain["stats"]["mean_accepted_length"] == 1.0 and plain["stats"]["decode_steps"] == 19


def test_bad_config_path(capsys):
    code, _, err = run_main(capsys, "generate", "--config", "configs/nope.yaml", "--prompt", "x")
    assert code == 2 and "config file not found" in err


def test_unknown_preset(tmp_path, capsys):
    cfg = re.sub(r"preset: \S+", "preset: mc_999", (REPO / "configs" / "smollm2-135m.yaml").read_text())
    (tmp_path / "c.yaml").write_text(cfg)
    code, _, err = run_main(capsys, "generate", "--config", str(tmp_path / "c.yaml"), "--prompt", "x")
    assert code == 2 and "unknown tree preset 'mc_999'" in err


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "-5"], "--max-tokens: must be >= 1"),
    (["--temperature", "-1"], "--temperature: must be in [0, 2]"),
    (["--temperature", "5"], "--temperature: must be in [0, 2]"),  # the HTTP API's bound
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--max-tokens", "100000"], "exceeds the context window"),
])
def test_bad_arguments(args, message, capsys):
    code, _, err = run_main(capsys, "generate", "--prompt", "x", *args)
    assert code == 2 and message in err


def test_input_errors_come_before_the_weights_load(monkeypatch, capsys):
    """An empty prompt is refused by the argument parser, before a model is loaded."""
    def no_loading(config):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(generator_module, "load_generator", no_loading)
    code, _, err = run_main(capsys, "generate", "--prompt", "")
    assert code == 2 and "--prompt: must not be empty" in err


def test_help_says_what_each_command_and_option_is(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "tools/commands.py)." in out  # the whole first paragraph, not a cut sentence
    code, out, _ = run_main(capsys, "generate", "--help")
    out = " ".join(out.split())  # argparse wraps lines
    assert code == 0 and "(default: 0.0)" in out and "the HTTP API defaults to 1" in out


def test_offline_hub_model_says_what_to_download(monkeypatch, capsys):
    import huggingface_hub.constants

    # HF_HUB_OFFLINE=1 in the environment is read once, when huggingface_hub is imported (already, here); the hub
    # reads this constant at each call. Without it a hub id waits ~50 s on network retries before failing.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_main(capsys, "generate", "--config", "configs/vicuna-7b-v1.3.yaml", "--prompt", "x")
    assert code == 2 and "hf download lmsys/vicuna-7b-v1.3" in err


def test_unreachable_hub_fails_at_once(monkeypatch, capsys):
    """A hub that cannot be reached (a host that never resolves, as on a machine without internet) fails within
    seconds with the same message, not after the hub client's retries (~50 s)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")  # RFC 2606: never resolves
    start = time.monotonic()
    code, _, err = run_main(capsys, "generate", "--config", "configs/vicuna-7b-v1.3.yaml", "--prompt", "x")
    assert code == 2 and "hf download lmsys/vicuna-7b-v1.3" in err
    assert time.monotonic() - start < 15, "waited on retries"


def test_prepare_names_a_bad_config(capsys):
    code, _, err = run_main(capsys, "prepare", "--config", "configs/nope.yaml")
    assert code == 2 and "config file not found" in err


def test_prepare_times_the_tree_costs_that_a_replica_reads(tmp_path, monkeypatch, capsys):
    """`prepare` (run by .ci/install, before Ray starts) leaves the adaptive tree's step costs in the cache root, so a
    replica loading the same config reads them instead of timing steps while Ray starts around it."""
    from medusa_core import adaptive
    from medusa_core.config import load_config
    from medusa_core.generator import load_generator

    # Same file name (the key: model, heads, tree, threads, CPU), an empty folder: the costs must come from this
    # prepare, not from an earlier run's file in the shared cache.
    cost_file = generator_module._cost_file
    monkeypatch.setattr(generator_module, "_cost_file", lambda c, h: tmp_path / cost_file(c, h).name)
    text = (REPO / "configs" / "smollm2-135m-llamacpp.yaml").read_text()
    path = tmp_path / "two-rows.yaml"  # a small calibration: batch sizes 1 and 2
    path.write_text(text.replace("adaptive: {max_batch: 8}", "adaptive: {max_batch: 2}"))
    code, out, err = run_main(capsys, "prepare", "--config", str(path))
    assert code == 0 and "tree costs timed" in out, err
    assert len(list(tmp_path.glob("tree-cost-*.json"))) == 1

    def no_timing(*args, **kwargs):
        raise AssertionError("the replica timed the steps again")

    monkeypatch.setattr(adaptive, "calibrate", no_timing)
    threads = torch.get_num_threads()
    try:
        policy = load_generator(load_config(path)).policy  # the config's torch_threads: 1, as in a replica
    finally:
        torch.set_num_threads(threads)  # the rest of this pytest process keeps its threads
    assert policy.batch_sizes == (1, 2) and all(s > 0 for row in policy.step_s for s in row)


def test_eval_changes_the_heads_folder_only_with_write_card(tmp_path, capsys):
    """`eval` prints (and writes --json); the shipped evaluation.json and model card change only with --write-card,
    and then the card's hand-written part is kept."""
    import shutil

    from medusa_core.tools import replies
    from medusa_core.tools.data import Encoded
    from medusa_core.tools.model_card import HAND_WRITTEN

    heads = tmp_path / "heads"
    shutil.copytree(REPO / "heads" / "smollm2-135m-instruct", heads, ignore=shutil.ignore_patterns("replies*"))
    ids = list(range(100, 400))  # a held-out "reply" of 300 tokens: the cache is its prefill
    replies.save_shard(replies.shard_path(tmp_path / "r", True, 0), [Encoded(ids, [False] * 20 + [True] * 280)])
    before = {p.name: p.read_bytes() for p in heads.iterdir()}
    argv = ["eval", "--heads", str(heads), "--data", "generated", "--replies", str(tmp_path / "r"), "--cache-dir",
            str(tmp_path / "c"), "--eval-tokens", "300", "--trees", "chain_2", "--prompts", "1",
            "--max-new-tokens", "4", "--json", str(tmp_path / "eval.json")]
    assert run_main(capsys, *argv)[0] in (0, None)
    assert {p.name: p.read_bytes() for p in heads.iterdir()} == before
    assert json.loads((tmp_path / "eval.json").read_text())["max_new_tokens"] == 4
    assert run_main(capsys, *argv, "--write-card")[0] in (0, None)
    assert json.loads((heads / "evaluation.json").read_text())["max_new_tokens"] == 4
    card = (heads / "README.md").read_text()
    assert "x 4 new tokens" in card and card.partition(HAND_WRITTEN)[2] == \
        before["README.md"].decode().partition(HAND_WRITTEN)[2]
