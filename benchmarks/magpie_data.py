"""Heads' data from user turns the model writes itself (Magpie), for a side-by-side against ShareGPT replies.

1. Sample user turns from the served Q8_0 file: the chat template up to the user's turn, then T 1.0, top_p 0.95,
   seed i (llama-cpp-python's `create_completion`, one row); keep those that end their turn within 64 tokens.
   They are kept in OUT/prompts.json, so a rerun answers the same prompts.
2. Answer them greedily with the `replies` tool (llama.cpp, 64 rows, 2 threads) into OUT/replies, shards like the
   ShareGPT ones, which `train --replies OUT/replies --cache-dir ...` reads (benchmarks/README.md, heads_compare.py).

    python benchmarks/magpie_data.py --prompts 1000 --reply-tokens 200000 --out /tmp/magpie
"""
import argparse
import json
from pathlib import Path

from llama_cpp import Llama
from tqdm import tqdm

from medusa_core.backends import load_backend
from medusa_core.config import load_config, resolve_repo_path
from medusa_core.tools import replies
from medusa_core.tools.data import Conversation

CONFIG = "configs/smollm2-135m-llamacpp.yaml"
MARK = "\x00"  # stands for the user's text, to cut the rendered template there


def user_turn(tokenizer) -> str:
    """The model's chat template (its default system turn included) up to where the user's text goes."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False)
    return text[: text.index(MARK)]


def sample_prompts(backend, n: int) -> list[str]:
    model = Llama(str(backend.gguf_path), n_ctx=256, n_threads=2, verbose=False)  # the served file
    prefix = user_turn(backend.tokenizer)
    prompts = []
    for i in tqdm(range(n), desc="sampling user turns", unit="prompt"):
        c = model.create_completion(prefix, max_tokens=64, temperature=1.0, top_p=0.95, stop=["<|im_end|>"],
                                    seed=i)["choices"][0]
        if c["finish_reason"] == "stop" and len(c["text"].strip()) >= 12:
            prompts.append(c["text"].strip())
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=1000, help="user turns to sample")
    ap.add_argument("--reply-tokens", type=int, default=200_000, help="stop answering at this many reply tokens")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = load_config(resolve_repo_path(CONFIG)).base_model
    base = base.model_copy(update={"llamacpp": base.llamacpp.model_copy(update={"n_seq_max": 64, "n_threads": 2})})
    backend = load_backend(base)
    prompts_file = args.out / "prompts.json"
    if not prompts_file.is_file():
        prompts_file.write_text(json.dumps(sample_prompts(backend, args.prompts), indent=0))
    prompts = json.loads(prompts_file.read_text())
    print(f"{len(prompts)} user turns in {prompts_file}")
    conversations = [Conversation(f"magpie-{i}", ({"role": "user", "content": p},)) for i, p in enumerate(prompts)]
    stored = replies.build(backend, iter(conversations), args.out / "replies", False, args.reply_tokens,
                           512, 256, rows=64)
    print(f"{stored} reply tokens in {args.out / 'replies'}")


if __name__ == "__main__":
    main()
