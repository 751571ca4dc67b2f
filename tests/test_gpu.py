"""The CUDA path (marker `gpu`; `bash benchmarks/gpu_check.sh` runs it): the embedded model with the shipped heads
in fp16 and bf16 on the transformers backend, the deployed tree mc_sim_7b_63, adaptive off.

- Medusa == plain, checked teacher-forced as in test_teacher_forced.py: an unpatched fp32 model on the GPU scores
  prompt + output in one pass, and at every generated position our token's fp32 logit must be within TOLERANCE of
  the max. In half precision the model's own logits are off the fp32 ones, so it may pick a token the fp32 model
  ranks a little lower, and Medusa's tree pass (other shapes, other kernels) may pick differently from plain decoding
  at such a near-tie. Both outputs pass the check, so wherever they part, both tokens are near-ties.
- Batched == alone, under the same rule: a request decoded alone may part from the batch only at a near-tie.
- `serve run` on serve_config.gpu.yaml (one GPU per decoder replica) with the model config swapped for the embedded
  model on cuda in fp16 (Vicuna's weights cannot be downloaded offline): the replica comes up healthy (it could not
  load a cuda model without the GPU Ray gives it), greedy HTTP output == the CLI's, concurrent requests batch and
  Medusa accepts.
"""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import zip_longest

import pytest
import torch
import yaml

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device: torch.cuda.is_available() is False", allow_module_level=True)

from equivalence import load_hf_reference
from serve_harness import REPO, complete, start_server
from test_teacher_forced import CHAT, N_NEW, mean_tokens_per_step

from medusa_core.config import DEFAULT_CONFIG, GeneratorConfig
from medusa_core.generator import GenerationResult, MedusaGenerator, load_generator
from medusa_core.request import Request

TREE = "mc_sim_7b_63"  # the deployed GPU tree (configs/vicuna-7b-v1.3.yaml)
# Allowance below the fp32 max logit: 128 x the dtype's machine epsilon (fp16 0.125, bf16 1.0). Measured with this
# model on 5 chat prompts x 64 tokens (fp16/bf16 unpatched vs fp32, CPU), the half model's logits are off the fp32
# ones by ~18 eps on average and at most ~170 eps (bf16 1.3, fp16 0.15): a flip is legitimate where the fp32 gap is
# within the half model's own error. Its plain greedy tokens were at most 35 eps (bf16 0.27) below the max. A wrong
# token (an accepted candidate the model did not choose) sits several logits below it (17 in test_teacher_forced.py).
TOLERANCE_EPS = 128
MAX_NEAR_TIES = 16  # per dtype and test (of 640 or 320 checked positions); measured: bf16 plain 5, fp16 1 of 320


def tolerance(dtype: str) -> float:
    return TOLERANCE_EPS * torch.finfo(getattr(torch, dtype)).eps


def gpu_config(dtype: str) -> dict:
    """configs/smollm2-135m.yaml on cuda in `dtype`, tree mc_sim_7b_63, adaptive off (the same tree every step)."""
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["base_model"].update(device="cuda", dtype=dtype)
    data["tree"].update(preset=TREE)
    data["tree"].pop("adaptive", None)
    return data


def margins(reference, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Reference max logit minus its logit for our token, at each generated position [N]; one forward pass."""
    ids = torch.tensor([list(prompt) + list(tokens)], device=reference.device)
    with torch.inference_mode():
        logits = reference(ids).logits[0, len(prompt) - 1 : -1].float()  # [N, V]: row i predicts tokens[i]
    ours = logits.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]  # [N]
    return (logits.max(dim=-1).values - ours).cpu()


def check_teacher_forced(reference, prompt: list[int], tokens: list[int], tolerance: float, label: str) -> int:
    """Fail unless each of our tokens is the reference's argmax up to `tolerance` (half precision reorders more than
    a runner-up); the number of near-ties."""
    gap = margins(reference, prompt, tokens)
    worst = int(gap.argmax())
    assert gap[worst] <= tolerance, (f"{label}: token {worst} ({tokens[worst]}) is {float(gap[worst]):.3e} below "
                                     f"the reference's max logit (allowance {tolerance:.0e})")
    ties = [(i, f"{float(g):.1e}") for i, g in enumerate(gap) if g > 0]
    if ties:
        print(f"{label}: near-ties (position, gap) {ties}")
    return len(ties)


@dataclass
class Decoded:
    dtype: str
    gen: MedusaGenerator
    prompts: list[list[int]]
    medusa: list[GenerationResult]  # the 5 chat prompts decoded as one batch
    plain: list[GenerationResult]


@pytest.fixture(scope="module")
def reference():
    return load_hf_reference(GeneratorConfig.model_validate(gpu_config("float32")).base_model, "cuda")


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def decoded(request) -> Decoded:
    gen = load_generator(GeneratorConfig.model_validate(gpu_config(request.param)))
    assert gen.backend.device.type == "cuda" and gen.backend.dtype == getattr(torch, request.param)
    assert gen.policy is None and gen.tree.num_nodes == 64
    prompts = [gen.encode_chat([{"role": "user", "content": text}]) for text in CHAT]
    medusa = gen.generate([Request(prompt_ids=tuple(p), max_tokens=N_NEW, ignore_eos=True) for p in prompts])
    plain = gen.generate([Request(prompt_ids=tuple(p), max_tokens=N_NEW, mode="plain", ignore_eos=True)
                          for p in prompts])
    return Decoded(request.param, gen, prompts, medusa, plain)


def first_parting(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def test_medusa_and_plain_are_the_fp32_models_argmax(decoded, reference):
    d, tol = decoded, tolerance(decoded.dtype)
    ties, partings = 0, []
    for text, prompt, medusa, plain in zip(CHAT, d.prompts, d.medusa, d.plain):
        assert len(medusa.token_ids) == len(plain.token_ids) == N_NEW
        for mode, result in (("medusa", medusa), ("plain", plain)):
            ties += check_teacher_forced(reference, prompt, list(result.token_ids), tol, f"{d.dtype} {mode} {text!r}")
        if (i := first_parting(medusa.token_ids, plain.token_ids)) is not None:
            partings.append((text, i))  # both checked above: both tokens at i are within tol of the fp32 max
    histogram = [sum(h) for h in zip_longest(*(r.stats.accept_len_histogram for r in d.medusa), fillvalue=0)]
    per_step = mean_tokens_per_step(d.medusa)
    print(f"{d.dtype}: {per_step:.2f} tokens per step, accept_len histogram {histogram}, {ties} near-ties "
          f"(tolerance {tol:.3g}), Medusa parts from plain at {partings}")
    assert per_step > 1.0, f"no speculated token was accepted ({per_step:.2f} per step): only plain was checked"
    assert ties <= MAX_NEAR_TIES, f"{ties} near-ties (at most {MAX_NEAR_TIES})"


def test_batched_equals_alone(decoded, reference):
    d, tol = decoded, tolerance(decoded.dtype)
    ties, partings = 0, []
    for text, prompt, together in zip(CHAT, d.prompts, d.medusa):
        alone = d.gen.generate([Request(prompt_ids=tuple(prompt), max_tokens=N_NEW, ignore_eos=True)])[0]
        # The batch's tokens pass the same check in the test above, so a parting can only be at a near-tie.
        ties += check_teacher_forced(reference, prompt, list(alone.token_ids), tol, f"{d.dtype} alone {text!r}")
        if (i := first_parting(alone.token_ids, together.token_ids)) is not None:
            partings.append((text, i))
    print(f"{d.dtype}: alone parts from batched at {partings}, {ties} near-ties")
    assert ties <= MAX_NEAR_TIES, f"{ties} near-ties (at most {MAX_NEAR_TIES})"


@pytest.mark.ray
def test_gpu_serve_config_serves_on_the_gpu(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump(gpu_config("float16")))
    cfg = yaml.safe_load((REPO / "serve_config.gpu.yaml").read_text())
    cfg["http_options"]["port"] = 8127
    cfg["applications"][0]["args"]["config"] = str(model)
    server = start_server(cfg, tmp_path, timeout_s=600)
    try:
        prompt = "The capital of France is"
        body = complete(server, prompt, 32)
        cli = subprocess.run([sys.executable, "-m", "medusa_core", "generate", "--config", str(model), "--prompt",
                              prompt, "--max-tokens", "32", "--json"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert cli.returncode == 0, cli.stderr
        assert body["choices"][0]["text"] == json.loads(cli.stdout.strip().splitlines()[-1])["text"]
        # Concurrent requests are not compared with alone here: in fp16 they may part at a near-tie, which only the
        # token-level check above can tell from a bug.
        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(lambda p: complete(server, p, 48, medusa={"ignore_eos": True}), CHAT + CHAT[:3]))
        stats = [b["medusa"] for b in bodies]
        assert all(b["usage"]["completion_tokens"] == 48 for b in bodies), [b["usage"] for b in bodies]
        assert max(s["batch_size"] for s in stats) > 1, stats
        assert max(s["mean_accepted_length"] for s in stats) > 1.0, stats
    finally:
        server.stop()
