"""Model and decoding settings: strict pydantic models for `configs/*.yaml`, and `load_config(path)`.

Every knob has one home here; unknown keys are errors (`extra="forbid"`), and a bad value names its field.
Relative paths in a config file resolve against the repository root (the folder holding `configs/`). What the code
makes (converted models, step costs, training caches) goes under `cache_root()`, outside the source tree.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medusa_core.tree import validate_paths
from medusa_core.tree_presets import preset_paths

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "smollm2-135m.yaml"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(Strict):
    """Where weights come from: exactly one of a local folder, a Hugging Face hub id, or an installed package."""

    path: str | None = Field(None, description="Local folder (relative paths resolve against the repo root).")
    hub_id: str | None = Field(None, description="Hugging Face hub repository id, e.g. lmsys/vicuna-7b-v1.3.")
    package: str | None = Field(None, description="Installed Python package whose folder holds the files.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("path", "hub_id", "package") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, hub_id, package (got {given or 'none'})")
        return self


MAX_CHAIN_NODES = 64  # llama.cpp backend: KV cells each row keeps beyond its context window, for a step's chain


class LlamaCppConfig(Strict):
    """llama.cpp context settings (backend: llamacpp). Each row of a batch has its own KV stream of
    context_length + MAX_CHAIN_NODES cells, so a request that fits the context window never runs out of KV space."""

    n_seq_max: int = Field(8, gt=0, le=64, description="Rows one context holds at once (one KV stream each); the "
                           "decoder admits no more, so serve_config's max_batch_size must not exceed it.")
    n_threads: int | None = Field(None, gt=0, description="CPU threads for llama_decode; default: all cores.")
    n_batch: int = Field(512, gt=0, description="Most tokens in one llama_decode; rows x chain nodes must fit.")
    n_ubatch: int = Field(63, gt=0, description="Tokens per llama.cpp compute pass (one llama_decode may run several). "
                          "At 64 and more its CPU matmul changes kernel and the float sums of a tree pass no longer "
                          "equal the sequential pass.")
    kv_type: Literal["f32", "f16", "bf16"] = Field("bf16", description="KV cache element type. With f32 or f16 and "
                                                   "more than one thread, llama.cpp's flash attention splits a one-token "
                                                   "pass over 512+ cells across threads (a chain pass it does not): "
                                                   "refused, as Medusa would no longer equal plain decoding.")
    flash_attn: bool = Field(True, description="Flash attention: each query row is computed alone, so a tree pass "
                             "equals the sequential pass (off, the KQ matmul's result depends on the batch shape).")
    requantize: Literal["F16", "BF16", "Q8_0", "Q4_0"] | None = Field(
        None, description="Run a copy of gguf_file re-encoded once by llama.cpp's quantizer into cache_dir. F16 and "
        "BF16 hold a Q4 file's weights to within their rounding and their CPU matmuls batch rows far better; Q4_0 is "
        "coarser than the shipped Q4_1 (faster, not the same model).")

    @model_validator(mode="after")
    def _exact(self) -> LlamaCppConfig:
        if self.flash_attn and self.kv_type != "bf16" and self.n_threads != 1:
            raise ValueError(f"kv_type {self.kv_type} with n_threads {self.n_threads or 'all cores'}: past 256 tokens "
                             "a one-token pass would not sum as a chain pass does; use kv_type bf16 or n_threads 1")
        return self


class BaseModelConfig(Strict):
    backend: Literal["hf", "llamacpp"] = Field("hf", description="Which backend runs the base model.")
    source: Source
    gguf_file: str | None = Field(None, description="GGUF file inside the source folder; dequantized on load.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:0, ...")
    torch_threads: int | None = Field(None, gt=0, description="torch.set_num_threads for this process.")
    context_length: int | None = Field(None, gt=0, description="Cap on prompt + generated tokens.")
    chat_template: str | None = Field(None, description="Jinja chat template; default: the tokenizer's own.")
    cache_dir: str | None = Field(
        None, description="Where converted copies of a GGUF-loaded model are kept (relative: to the repo root); "
        "default: <cache root>/models, the cache root being $MEDUSA_CACHE or ~/.cache/medusa-serve."
    )
    llamacpp: LlamaCppConfig = Field(LlamaCppConfig(), description="llama.cpp context (backend: llamacpp only).")

    @model_validator(mode="after")
    def _backend_settings(self) -> BaseModelConfig:
        if self.backend != "llamacpp" and "llamacpp" in self.model_fields_set:
            raise ValueError("llamacpp settings need backend: llamacpp")
        if self.backend == "llamacpp" and self.gguf_file is None:
            raise ValueError("backend llamacpp needs gguf_file")
        return self


class RandomHeads(Strict):
    num_heads: int = Field(gt=0, le=16)
    seed: int = 0
    scale: float = Field(0.02, ge=0, description="Std of the ResBlock weights; 0 makes every head the identity.")


class HeadsConfig(Strict):
    """Medusa heads: a published-format checkpoint folder, or seeded random heads on the shared lm_head."""

    source: Source | None = None
    random: RandomHeads | None = None
    head_vocab: int | None = Field(None, gt=0, description="Heads rank only token ids below this (BPE ids run "
                                   "roughly by merge frequency): cuts the heads' shared lm_head cost by V/head_vocab.")

    @model_validator(mode="after")
    def _exactly_one(self) -> HeadsConfig:
        if (self.source is None) == (self.random is None):
            raise ValueError("give exactly one of heads.source or heads.random")
        return self


class AdaptiveConfig(Strict):
    max_batch: int = Field(8, ge=1, le=256, description="Largest batch size the step cost is timed at on startup.")
    explore_share: float = Field(0.03, ge=0, le=0.5, description="Share of decoding time the policy may spend "
                                 "verifying the whole tree to keep measuring every node's acceptance.")


class LookupConfig(Strict):
    """Prompt lookup (medusa_core/lookup.py): where the history's last n tokens occurred before, what followed them
    takes rank 0 of each depth, ahead of the heads' candidates."""

    min_ngram: int = Field(1, ge=1, le=16, description="Shortest suffix of the history looked up.")
    max_ngram: int = Field(4, ge=1, le=16, description="Longest suffix looked up (tried first).")

    @model_validator(mode="after")
    def _order(self) -> LookupConfig:
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) is larger than max_ngram ({self.max_ngram})")
        return self


class TreeConfig(Strict):
    preset: str | None = Field(None, description="A name from medusa_core.tree_presets.")
    paths: list[list[int]] | None = Field(None, description="Explicit paths of head ranks (root implicit).")
    top_k: int = Field(10, gt=0, le=64, description="Candidates taken from each head.")
    adaptive: AdaptiveConfig | None = Field(None, description="Choose a prefix of the tree (or none) per step by "
                                            "measured cost and acceptance; absent: always the whole tree.")
    lookup: LookupConfig | None = Field(None, description="Merge prompt-lookup guesses into the heads' candidates "
                                        "(rank 0 of each depth); a tree may then be deeper than the heads.")

    @model_validator(mode="after")
    def _check(self) -> TreeConfig:
        if (self.preset is None) == (self.paths is None):
            raise ValueError("give exactly one of tree.preset or tree.paths")
        validate_paths(self.resolved_paths(), self.top_k)
        return self

    def resolved_paths(self) -> list[list[int]]:
        return preset_paths(self.preset) if self.preset is not None else list(self.paths or [])


class DecodingConfig(Strict):
    max_new_tokens: int = Field(256, gt=0, description="Default when a request does not say.")
    typical_epsilon: float = Field(0.09, gt=0, le=1, description="Typical acceptance hard threshold.")
    typical_alpha: float = Field(0.3, gt=0, le=1, description="Typical acceptance entropy factor.")


class GeneratorConfig(Strict):
    name: str = Field(description="Model name reported by the API.")
    base_model: BaseModelConfig
    heads: HeadsConfig | None = Field(None, description="Absent: no Medusa heads; requests decode plainly, or with "
                                      "prompt lookup alone where tree.lookup is set.")
    tree: TreeConfig | None = Field(None, description="What a speculative step verifies; needs heads or tree.lookup.")
    decoding: DecodingConfig = DecodingConfig()

    @model_validator(mode="after")
    def _tree_has_a_drafter(self) -> GeneratorConfig:
        if self.heads is not None and self.tree is None:
            raise ValueError("tree: heads need a tree to verify, e.g. `tree: {preset: chain_2}`")
        if self.heads is None and self.tree is not None and self.tree.lookup is None:
            raise ValueError("tree: without heads only prompt lookup can fill a tree; set tree.lookup, add heads, "
                             "or drop the tree to decode plainly")
        return self

    @model_validator(mode="after")
    def _tree_fits_llamacpp(self) -> GeneratorConfig:
        """llama.cpp verifies chains (one KV sequence per row): reject branching trees."""
        if self.base_model.backend != "llamacpp" or self.tree is None:
            return self
        paths = [tuple(p) for p in self.tree.resolved_paths()]
        parents = {p[:-1] for p in paths}
        if sum(p not in parents for p in paths) > 1:
            raise ValueError("tree: the llama.cpp backend verifies chains (each node at most one child), e.g. "
                             "preset chain_2; this tree branches")
        if len(paths) + 1 > MAX_CHAIN_NODES:
            raise ValueError(f"tree has {len(paths) + 1} nodes; the llama.cpp backend keeps room for "
                             f"{MAX_CHAIN_NODES} per row")
        return self


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message names the file and field."""


def load_config(path: str | Path) -> GeneratorConfig:
    """Read and validate a YAML config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(expand_env(path.read_text(), path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        return GeneratorConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: {problems}") from e


def expand_env(text: str, path: Path) -> str:
    """`${NAME}` -> the environment variable NAME (ConfigError if unset); `${NAME:-default}` -> NAME if set, else
    `default`, which may hold YAML with braces (e.g. `${MODEL_SOURCE:-{hub_id: org/model}}`). Where a config is loaded:
    on the head node when Serve builds the app."""
    out, i = [], 0
    while (start := text.find("${", i)) >= 0:
        end, depth = start + 2, 1
        while depth and end < len(text):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:
            raise ConfigError(f"{path}: unclosed ${{ at character {start}")
        name, sep, default = text[start + 2 : end - 1].partition(":-")
        value = os.environ.get(name, default if sep else None)
        if value is None:
            raise ConfigError(f"{path}: environment variable {name} is not set (or give a default: ${{{name}:-...}})")
        out += [text[i:start], value]
        i = end
    return "".join(out + [text[i:]])


def cache_root() -> Path:
    """Where models, step costs and training caches are kept: $MEDUSA_CACHE, else the user's cache folder. Never the
    source tree, so an installed package, a read-only checkout and several checkouts all work (and share it)."""
    if root := os.environ.get("MEDUSA_CACHE"):
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medusa-serve"


def models_cache(config: BaseModelConfig) -> Path:
    """The folder for a model's converted copies (tokenizer, dequantized or re-encoded weights)."""
    return resolve_repo_path(config.cache_dir) if config.cache_dir else cache_root() / "models"


def resolve_repo_path(p: str) -> Path:
    """A config path: absolute as given, else relative to the repository root."""
    q = Path(p).expanduser()
    return q if q.is_absolute() else REPO_ROOT / q
