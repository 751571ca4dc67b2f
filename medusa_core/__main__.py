"""Command line: `python -m medusa_core generate|chat|prepare|convert|replies|train|eval|tune-tree|export-onnx [...]`
(replies, train, eval, tune-tree and export-onnx: tools/commands.py).

Errors print one line naming the problem and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import get_args

from medusa_core.config import DEFAULT_CONFIG, ConfigError, load_config
from medusa_core.heads import HeadsFormatError
from medusa_core.request import Acceptance, Mode
from medusa_core.tools import commands


def _positive_int(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _temperature(s: str) -> float:
    t = float(s)
    if not 0 <= t <= 2:  # the HTTP API's bounds
        raise argparse.ArgumentTypeError(f"must be in [0, 2], got {s}")
    return t


def _top_p(s: str) -> float:
    p = float(s)
    if not 0 < p <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return p


def _prompt(s: str) -> str:
    if not s:  # refused here, before the weights load
        raise argparse.ArgumentTypeError("must not be empty")
    return s


def _decoding_options(p: argparse.ArgumentParser) -> None:
    """The options `generate` and `chat` share: which model, and how to decode."""
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config YAML (default: embedded model)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="new tokens (default: config)")
    p.add_argument("--mode", choices=get_args(Mode), default="medusa", help="medusa: speculate with the heads; "
                   "plain: one token per step (the baseline)")
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0: greedy, so a run is reproducible "
                   "(the HTTP API defaults to 1, as OpenAI's does); at most 2, as over HTTP")
    p.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--acceptance", choices=get_args(Acceptance), default=None,
                   help="default: greedy at temperature 0, lossless above it")
    p.add_argument("--seed", type=int, default=None, help="seeded sampling: the same tokens as plain sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medusa_core", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--prompt", required=True, type=_prompt, help="prompt text (a user message with --chat)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt with the model's chat template")
    _decoding_options(gen)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    chat = sub.add_parser("chat", help="chat in the terminal: multi-turn, replies streamed, /reset, /quit",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _decoding_options(chat)
    prep = sub.add_parser("prepare", help="load a model config once, so that its converted copies, tokenizer and "
                          "adaptive tree costs are cached before the first test or replica needs them")
    prep.add_argument("--config", nargs="+", default=[str(DEFAULT_CONFIG)], help="model config YAML files")
    conv = sub.add_parser("convert", help="convert a Hugging Face Llama folder to GGUF (and quantize it)")
    conv.add_argument("folder", help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    conv.add_argument("--out", required=True, help="output .gguf file")
    conv.add_argument("--outtype", choices=["f32", "f16"], default="f16", help="float type written by gguf")
    conv.add_argument("--quant", default=None, help="then quantize with llama.cpp: Q8_0, Q4_K_M, Q4_0, ...")
    conv.add_argument("--threads", type=_positive_int, default=None, help="quantizer threads (default: all)")
    conv.add_argument("--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name for unknown BPE setups")
    commands.add_parsers(sub, str(DEFAULT_CONFIG))
    return parser


def _one_request_generator(args: argparse.Namespace):
    """The config's generator for one request at a time (an adaptive tree times batch size 1 only), and the
    request template the decoding options describe."""
    from medusa_core.generator import load_generator
    from medusa_core.request import Request, SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              acceptance=args.acceptance)
    config = load_config(args.config)
    if config.tree is not None and config.tree.adaptive is not None:
        adaptive = config.tree.adaptive.model_copy(update={"max_batch": 1})
        config = config.model_copy(update={"tree": config.tree.model_copy(update={"adaptive": adaptive})})
    return load_generator(config), Request(max_tokens=args.max_tokens, sampling=sampling, mode=args.mode)


def chat(args: argparse.Namespace) -> None:
    from medusa_core.chat import run_chat

    generator, template = _one_request_generator(args)
    run_chat(generator, template, sys.stdin, sys.stdout, sys.stderr)


def generate(args: argparse.Namespace) -> None:
    generator, template = _one_request_generator(args)
    text = {"messages": ({"role": "user", "content": args.prompt},)} if args.chat else {"prompt": args.prompt}
    request = dataclasses.replace(template, **text, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    result = generator.generate([request])[0]
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": list(result.token_ids),
                          "finish_reason": result.finish_reason, "stats": dataclasses.asdict(result.stats)}))
    else:
        s = result.stats
        print(result.text)
        print(f"[{s.generated_tokens} tokens, {s.decode_steps} steps, {s.mean_accepted_length:.2f} tokens/step, "
              f"{s.tokens_per_second:.1f} tokens/s]", file=sys.stderr)


def prepare(args: argparse.Namespace) -> None:
    from medusa_core.generator import load_generator

    for path in args.config:
        config = load_config(path)
        generator = load_generator(config)  # with tree.adaptive: its step costs are timed now, on a quiet machine
        print(f"{path}: {config.name} ready ({config.base_model.backend}, vocab {generator.backend.vocab_size}"
              f"{', tree costs timed' if generator.policy is not None else ''})")


def convert(args: argparse.Namespace) -> None:
    from medusa_core.backends.gguf_files import convert as run_convert

    print(run_convert(args.folder, args.out, args.outtype, args.quant, args.threads, args.tokenizer_pre))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"generate": generate, "chat": chat, "prepare": prepare, "convert": convert, "train": commands.train_command,
         "eval": commands.eval_command, "tune-tree": commands.tune_tree_command,
         "replies": commands.replies_command, "export-onnx": commands.export_onnx_command}[args.command](args)
    except (ConfigError, HeadsFormatError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
