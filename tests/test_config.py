"""Every shipped config validates; bad configs fail with the field named."""
from pathlib import Path

import pytest

from medusa_core.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
GOOD = """
name: t
base_model: {source: {path: somewhere}}
heads: {random: {num_heads: 2}}
tree: {preset: chain_2}
"""


def test_configs_exist():
    assert any(p.name == "smollm2-135m.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.tree.resolved_paths()


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_minimal_config(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.decoding.max_new_tokens == 256 and cfg.tree.top_k == 10


@pytest.mark.parametrize("change, field", [
    (("tree: {preset: chain_2}", "tree: {preset: nope}"), "tree"),
    (("name: t", "name: t\nbogus: 1"), "bogus"),
    (("{random: {num_heads: 2}}", "{random: {num_heads: 0}}"), "heads.random.num_heads"),
    (("{source: {path: somewhere}}", "{source: {path: a, hub_id: b}}"), "base_model.source"),
    (("{source: {path: somewhere}}", "{source: {path: a}, dtype: float8}"), "base_model.dtype"),
    (("tree: {preset: chain_2}", "tree: {paths: [[0, 0]]}"), "lacks its parent"),
    (("tree: {preset: chain_2}", "tree: {preset: chain_2, lookup: {min_ngram: 3, max_ngram: 2}}"), "tree.lookup"),
    (("tree: {preset: chain_2}", "tree: {preset: chain_2, lookup: {min_ngram: 0}}"), "tree.lookup.min_ngram"),
])
def test_bad_config_names_field(tmp_path, change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(write(tmp_path, GOOD.replace(*change)))


def test_a_config_without_heads_is_plain_or_lookup(tmp_path):
    plain = load_config(write(tmp_path, GOOD.replace("heads: {random: {num_heads: 2}}\ntree: {preset: chain_2}\n", "")))
    assert plain.heads is None and plain.tree is None
    lookup = GOOD.replace("heads: {random: {num_heads: 2}}\n", "").replace("chain_2}", "chain_2, lookup: {}}")
    assert load_config(write(tmp_path, lookup)).tree.lookup is not None
    with pytest.raises(ConfigError, match="tree: heads need a tree"):
        load_config(write(tmp_path, GOOD.replace("tree: {preset: chain_2}\n", "")))
    with pytest.raises(ConfigError, match="tree: without heads only prompt lookup"):
        load_config(write(tmp_path, GOOD.replace("heads: {random: {num_heads: 2}}\n", "")))


def test_environment_variables_fill_a_config(tmp_path, monkeypatch):
    text = GOOD.replace("{source: {path: somewhere}}", "{source: ${MODEL_SOURCE:-{path: fallback}}}")
    assert load_config(write(tmp_path, text)).base_model.source.path == "fallback"
    monkeypatch.setenv("MODEL_SOURCE", "{hub_id: org/model}")
    assert load_config(write(tmp_path, text)).base_model.source.hub_id == "org/model"
    with pytest.raises(ConfigError, match="environment variable NOT_SET_ANYWHERE is not set"):
        load_config(write(tmp_path, GOOD.replace("name: t", "name: ${NOT_SET_ANYWHERE}")))


def test_lookup_config(tmp_path):
    cfg = load_config(write(tmp_path, GOOD.replace("tree: {preset: chain_2}", "tree: {preset: chain_5, lookup: {}}")))
    assert (cfg.tree.lookup.min_ngram, cfg.tree.lookup.max_ngram) == (1, 4)
    assert load_config(write(tmp_path, GOOD)).tree.lookup is None


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,"))


LLAMACPP = GOOD.replace("base_model: {source: {path: somewhere}}",
                        "base_model: {backend: llamacpp, source: {path: somewhere}, gguf_file: m.gguf,\n"
                        "             llamacpp: {n_threads: 2, n_batch: 64, n_seq_max: 4}}")


def test_llamacpp_settings(tmp_path):
    cfg = load_config(write(tmp_path, LLAMACPP))
    s = cfg.base_model.llamacpp
    assert (s.n_threads, s.n_batch, s.n_seq_max, s.kv_type, s.flash_attn) == (2, 64, 4, "bf16", True)
    for kv_type in ("f16", "f32"):  # split across threads past 256 tokens (test_llamacpp): Medusa != plain
        with pytest.raises(ConfigError, match=f"kv_type {kv_type} with n_threads 2"):
            load_config(write(tmp_path, LLAMACPP.replace("n_seq_max: 4}", f"n_seq_max: 4, kv_type: {kv_type}}}")))
    one = LLAMACPP.replace("n_threads: 2", "n_threads: 1").replace("n_seq_max: 4}", "n_seq_max: 4, kv_type: f16}")
    assert load_config(write(tmp_path, one)).base_model.llamacpp.kv_type == "f16"
    assert s.n_ubatch == 63 and s.requantize is None
    for encoding in ("F16", "BF16", "Q8_0", "Q4_0"):
        text = LLAMACPP.replace("n_seq_max: 4}", f"n_seq_max: 4, requantize: {encoding}}}")
        assert load_config(write(tmp_path, text)).base_model.llamacpp.requantize == encoding


@pytest.mark.parametrize("change, field", [
    (("n_seq_max: 4}", "n_seq_max: 4, bogus: 1}"), "base_model.llamacpp.bogus"),
    (("n_seq_max: 4}", "n_seq_max: 0}"), "base_model.llamacpp.n_seq_max"),
    (("n_seq_max: 4}", "n_seq_max: 65}"), "base_model.llamacpp.n_seq_max"),
    (("n_seq_max: 4}", "n_seq_max: 4, n_ctx: 8192}"), "base_model.llamacpp.n_ctx"),
    (("n_seq_max: 4}", "n_seq_max: 4, requantize: Q2_K}"), "base_model.llamacpp.requantize"),
    (("backend: llamacpp, ", ""), "llamacpp settings need backend: llamacpp"),
    ((", gguf_file: m.gguf", ""), "backend llamacpp needs gguf_file"),
    (("tree: {preset: chain_2}", "tree: {preset: mc_16}"), "verifies chains"),
    (("tree: {preset: chain_2}", "tree: {paths: [[0], [1]]}"), "verifies chains"),
    (("tree: {preset: chain_2}", f"tree: {{paths: {[[0] * d for d in range(1, 65)]}}}"), "room for 64"),
])
def test_bad_llamacpp_config(tmp_path, change, field):
    text = LLAMACPP.replace(*change)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_cache_root_is_a_setting_outside_the_source_tree(monkeypatch, tmp_path):
    """Converted models, step costs and training caches go under $MEDUSA_CACHE, else the user's cache folder: never
    the checkout, so a read-only checkout, an installed package and several checkouts all work."""
    from medusa_core.config import REPO_ROOT, cache_root, models_cache

    served = load_config(Path(REPO_ROOT, "configs", "smollm2-135m-llamacpp.yaml")).base_model
    monkeypatch.setenv("MEDUSA_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and models_cache(served) == tmp_path / "c" / "models"
    monkeypatch.delenv("MEDUSA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "medusa-serve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "medusa-serve"
    assert models_cache(served.model_copy(update={"cache_dir": "/srv/models"})) == Path("/srv/models")
    for folder in ("medusa_core", "deployments"):  # no code path writes a cache into the source tree by itself
        for path in (REPO_ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert '".cache/' not in text and 'ROOT / ".cache"' not in text, f"{path}: a cache inside the checkout"
