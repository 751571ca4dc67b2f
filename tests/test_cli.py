"""The CLI: JSON output of a real generation, and one clear line for each kind of bad input."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "medusa_core", "generate", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, **(env or {})})


def test_json_output_medusa_equals_plain():
    runs = {m: cli("--prompt", "The capital of France is", "--max-tokens", "20", "--mode", m, "--ignore-eos",
                   "--json") for m in ("medusa", "plain")}
    out = {m: json.loads(r.stdout) for m, r in runs.items()}
    assert out["medusa"]["token_ids"] == out["plain"]["token_ids"]
    stats = out["medusa"]["stats"]
    assert stats["generated_tokens"] == 20 and len(out["medusa"]["token_ids"]) == 20
    assert stats["decode_steps"] >= 1 and stats["mean_accepted_length"] >= 1.0 and stats["tokens_per_second"] > 0
    assert out["plain"]["stats"]["mean_accepted_length"] == 1.0


def test_bad_config_path():
    r = cli("--config", "configs/nope.yaml", "--prompt", "x")
    assert r.returncode == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr


def test_unknown_preset(tmp_path):
    cfg = re.sub(r"preset: \S+", "preset: mc_999", (REPO / "configs" / "smollm2-135m.yaml").read_text())
    (tmp_path / "c.yaml").write_text(cfg)
    r = cli("--config", str(tmp_path / "c.yaml"), "--prompt", "x")
    assert r.returncode == 2 and "unknown tree preset 'mc_999'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "-5"], "--max-tokens: must be >= 1"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--max-tokens", "100000"], "exceeds the context window"),
])
def test_bad_arguments(args, message):
    r = cli("--prompt", "x", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_offline_hub_model_says_what_to_download():
    r = cli("--config", "configs/vicuna-7b-v1.3.yaml", "--prompt", "x", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "hf download lmsys/vicuna-7b-v1.3" in r.stderr and "Traceback" not in r.stderr


def test_prepare_names_a_bad_config():
    r = subprocess.run([sys.executable, "-m", "medusa_core", "prepare", "--config", "configs/nope.yaml"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr


def test_prepare_times_the_tree_costs_that_a_replica_reads(tmp_path, monkeypatch):
    """`prepare` (run by .ci/install, before Ray starts) leaves the adaptive tree's step costs in .cache/medusa, so a
    replica loading the same config reads them instead of timing steps while Ray starts around it."""
    from medusa_core import adaptive
    from medusa_core.config import load_config
    from medusa_core.generator import load_generator

    text = (REPO / "configs" / "smollm2-135m-llamacpp.yaml").read_text()
    path = tmp_path / "two-rows.yaml"  # a small calibration: batch sizes 1 and 2
    path.write_text(text.replace("adaptive: {max_batch: 8}", "adaptive: {max_batch: 2}"))
    r = subprocess.run([sys.executable, "-m", "medusa_core", "prepare", "--config", str(path)], capture_output=True,
                       text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0 and "tree costs timed" in r.stdout, r.stderr

    def no_timing(*args, **kwargs):
        raise AssertionError("the replica timed the steps again")

    monkeypatch.setattr(adaptive, "calibrate", no_timing)
    threads = torch.get_num_threads()
    try:
        policy = load_generator(load_config(path)).policy  # the config's torch_threads: 1, as in a replica
    finally:
        torch.set_num_threads(threads)  # the rest of this pytest process keeps its threads
    assert policy.batch_sizes == (1, 2) and all(s > 0 for row in policy.step_s for s in row)
