"""Train Medusa heads on a hidden-state cache (Medusa-1: base model frozen, heads only).

Loss = sum_k 0.8^k * CE_k, head k (0-based) at position t predicting token t+k+2, on assistant tokens only; AdamW,
lr 1e-3, cosine schedule with 10 % linear warm-up. Targets are the base model's own argmax ("self", the
self-distillation of the Medusa paper), the text's tokens ("dataset"; see `distill.HiddenCache.targets`) or the base
model's whole distribution for token t+k+2 ("soft": cross-entropy against softmax(lm_head(hidden at t+k+1)), which
the cache holds for free, so a head also learns how sure the base model is and what its runners-up are).

`vocab="batch"` restricts each step's softmax to the batch's candidate tokens: the union of the base model's top-k
(`candidates`) predictions at every target position of the batch (which contains every "self" target). The heads then learn to
rank the tokens the base model finds plausible, at a fraction of the full-vocabulary cost; `vocab="full"` is the
reference loss. Evaluation always ranks over the full vocabulary.

Checkpoints hold the heads, the optimizer, the step and the batch sampler's rng state, so a resumed run is
bit-identical to an uninterrupted one. `train_ray` runs the same loop data-parallel on Ray Train workers
(`TorchTrainer`; gloo on CPU, NCCL on GPU); gradients are averaged with an explicit all-reduce.

Differences from FasterDecoding/Medusa: the reference trains with the HF Trainer on the live base model; here the
base model's outputs come from a cache, and the lm_head is shared (version 2), so only the ResBlocks train.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from medusa_core.files import written_whole
from medusa_core.heads import MedusaHeads
from medusa_core.tools.distill import HiddenCache, load_lm_head

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    num_heads: int = 4
    num_layers: int = 1  # ResBlocks per head
    root_conditioned: bool = False  # heads also read the root token (see heads.py)
    sequential: bool = False  # head k also reads the token before its target (Hydra-style; see heads.py)
    targets: Literal["self", "dataset", "soft"] = "self"
    vocab: Literal["full", "batch"] = "batch"
    steps: int = 1000
    batch_positions: int = 256  # positions per step (per worker); each trains all K heads
    candidates: int = 4  # vocab="batch": the base model's top-k per target position joins the batch softmax
    lr: float = 1e-3
    warmup: float = 0.1  # fraction of steps
    weight_decay: float = 0.0
    head_decay: float = 0.8  # lambda_k = head_decay ** k
    seed: int = 0
    checkpoint_every: int = 100


@dataclass(frozen=True)
class TrainResult:
    heads: MedusaHeads
    losses: list[float]  # per step (this worker's batch)
    steps: int
    seconds: float


def loss_positions(cache: HiddenCache) -> Tensor:
    """Positions t whose head-0 target t+2 is an assistant token in the same sequence: the sampling pool [N]."""
    t = torch.arange(cache.num_tokens)
    ok = (t + 2 < cache.seq_end) & cache.assistant[(t + 2).clamp(max=cache.num_tokens - 1)]
    return t[ok]


def cached_head_hidden(heads: MedusaHeads, cache: HiddenCache, positions: Tensor) -> Tensor:
    """Per-head hidden states [N, K, H] at cached positions [N] (with each position's root, and for sequential
    heads the base model's own token before each head's target): what training and evaluation feed the lm_head."""
    root_rows = cache.root_rows(positions) if heads.root is not None else None  # [N, H]
    prev_rows = None
    if heads.prev is not None:  # head k's previous token is the base model's argmax at t+k (k = 0: the root)
        at = (positions[:, None] + torch.arange(heads.num_heads)[None, :]).clamp(max=cache.num_tokens - 1)
        prev_rows = cache.lm_head[cache.top_ids[at, 0]]  # [N, K, H]
    return heads.head_hidden(cache.hidden[positions].float(), root_rows, prev_rows)


def head_loss(heads: MedusaHeads, cache: HiddenCache, positions: Tensor, cfg: TrainConfig) -> Tensor:
    """The weighted Medusa loss for a batch of positions [N]."""
    target, valid = cache.targets(positions, cfg.num_heads, "self" if cfg.targets == "soft" else cfg.targets)  # [N, K]
    x = cached_head_hidden(heads, cache, positions)  # [N, K, H]
    at = (positions[:, None] + torch.arange(cfg.num_heads)[None, :] + 1).clamp(max=cache.num_tokens - 1)  # [N, K]
    vocab = cache.lm_head
    if cfg.vocab == "batch":
        vocab_ids, inverse = torch.unique(torch.cat([cache.top_ids[at, : cfg.candidates].flatten(), target.flatten()]),
                                          return_inverse=True)  # [C]
        target = inverse[-target.numel():].view_as(target)  # targets as indices into vocab_ids
        vocab = cache.lm_head[vocab_ids]  # [C, H]
    logits = x @ vocab.T  # [N, K, C or V]
    if cfg.targets == "soft":  # the base model's distribution over the same vocabulary, at t+k+1
        target = torch.softmax(cache.hidden[at].float() @ vocab.T, dim=-1)  # [N, K, C or V]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1), reduction="none")
    ce = ce.view_as(valid) * valid  # [N, K]
    weights = cfg.head_decay ** torch.arange(cfg.num_heads, dtype=torch.float32)  # [K]
    per_head = ce.sum(0) / valid.sum(0).clamp(min=1)  # [K]
    return (per_head * weights).sum()


def lr_factor(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


def new_heads(cfg: TrainConfig, hidden: int) -> MedusaHeads:
    """Version-2 heads (shared lm_head), `num_layers` ResBlocks each, zero-initialised like the reference."""
    return MedusaHeads(cfg.num_heads, cfg.num_layers, hidden, vocab=None,
                       root_conditioned=cfg.root_conditioned or cfg.sequential, sequential=cfg.sequential)


def train(cache: HiddenCache, cfg: TrainConfig, out_dir: str | Path | None = None, resume: bool = True,
          stop_after: int | None = None, rank: int = 0, world: int = 1,
          max_seconds: float | None = None) -> TrainResult:
    """Train from scratch, or from out_dir/checkpoint.pt when resume is set; `stop_after` simulates a kill.
    `max_seconds` of training time (resumed runs included) ends the run early, checkpointed, to resume later."""
    torch.manual_seed(cfg.seed)
    heads = new_heads(cfg, cache.hidden.shape[1])
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    rng = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    step, losses, spent = 0, [], 0.0
    ckpt = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        step, losses, spent = _load_checkpoint(ckpt, heads, opt, sched, rng, cfg, rank)
    pool = loss_positions(cache)
    assert len(pool) > 0, "the cache holds no assistant tokens to train on"
    start = time.perf_counter() - spent
    bar = tqdm(total=cfg.steps, initial=step, desc=f"training {cfg.num_heads} heads", disable=rank != 0)
    while step < cfg.steps and (stop_after is None or step < stop_after):
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            print(f"time budget spent at step {step} of {cfg.steps}; run again to resume")
            break
        positions = pool[torch.randint(len(pool), (cfg.batch_positions,), generator=rng)]
        loss = head_loss(heads, cache, positions, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _all_reduce_grads(heads, world)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        out_of_time = max_seconds is not None and time.perf_counter() - start > max_seconds
        if ckpt is not None and rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time):
            _save_checkpoint(ckpt, heads, opt, sched, rng, step, losses, time.perf_counter() - start, cfg)
    bar.close()
    return TrainResult(heads.requires_grad_(False), losses, step, time.perf_counter() - start)


def _all_reduce_grads(heads: MedusaHeads, world: int) -> None:
    for p in heads.parameters():
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def _save_checkpoint(path: Path, heads, opt, sched, rng, step: int, losses: list[float], seconds: float,
                     cfg: TrainConfig) -> None:
    state = {"heads": heads.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "sampler": rng.get_state(), "step": step, "losses": losses, "seconds": seconds,
             "config": asdict(cfg)}
    with written_whole(path) as tmp:  # a kill mid-write leaves the previous checkpoint intact
        torch.save(state, tmp)


def _load_checkpoint(path: Path, heads, opt, sched, rng, cfg: TrainConfig, rank: int
                     ) -> tuple[int, list[float], float]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != asdict(cfg):
        raise ValueError(f"{path} was written with a different training config: {state['config']}; "
                         f"use another --out folder or --no-resume")
    heads.load_state_dict(state["heads"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    if rank == 0:
        rng.set_state(state["sampler"])
    else:  # other workers' rngs are not checkpointed: reseed them by step so they do not replay rank 0
        rng.manual_seed(cfg.seed * 1000 + rank + 7919 * state["step"])
    return state["step"], list(state["losses"]), state["seconds"]


def train_ray(cache_paths: list[Path], cfg: TrainConfig, out_dir: str | Path, num_workers: int,
              use_gpu: bool = False) -> MedusaHeads:
    """Data-parallel training on Ray Train workers; rank 0 checkpoints into out_dir. Returns the trained heads."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cache_paths": [str(p) for p in cache_paths], "cfg": asdict(cfg), "out_dir": str(out_dir)},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    trainer.fit()
    state = torch.load(Path(out_dir) / CHECKPOINT, map_location="cpu", weights_only=True)
    heads = new_heads(cfg, state["heads"]["weight"].shape[-1])
    heads.load_state_dict(state["heads"])
    return heads.requires_grad_(False)


def _ray_worker(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    torch.set_num_threads(1)  # workers share the machine's cores
    paths = [Path(p) for p in config["cache_paths"]]
    lm_head = load_lm_head(paths[0].parent)  # once: the shards of one split share it
    cache = HiddenCache.concat([HiddenCache.load(p, lm_head) for p in paths])
    train(cache, TrainConfig(**config["cfg"]), config["out_dir"], resume=True,
          rank=ctx.get_world_rank(), world=ctx.get_world_size())
