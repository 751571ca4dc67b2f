"""The code's rooms keep their doors (docs/design.md, "Layout and words"): the engine never imports the tools, only
`medusa_core/backends/` touches transformers or llama_cpp, `medusa_core/` never imports Ray Serve, FastAPI or the
deployments (the tools' optional Ray Train path imports Ray inside its functions), and no modules import each
other in a cycle. Read from the source with `ast`, so an import inside a function counts too."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "medusa_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import in the file; `from a import b` also names a.b, which
    is the submodule when b is one."""
    tree, found = ast.parse(path.read_text()), []
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, id(node) in top)] + [(f"{node.module}.{a.name}", id(node) in top)
                                                         for a in node.names]
    return found


def sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def in_room(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


def test_engine_never_imports_the_tools():
    """The CLI (`__main__`) is the one door to both: it dispatches the tools' subcommands."""
    engine = [p for p in sources(CORE) if "tools" not in p.relative_to(CORE).parts and p.name != "__main__.py"]
    assert len(engine) > 10
    bad = [(module_name(p), m) for p in engine for m, _ in imports(p) if in_room(m, "medusa_core.tools")]
    assert not bad, f"engine modules importing the tools: {bad}"


def test_only_backends_touch_transformers_and_llama_cpp():
    backends = CORE / "backends"
    bad = [(module_name(p), m) for p in sources(CORE) + sources(ROOT / "deployments") if backends not in p.parents
           for m, _ in imports(p) if in_room(m, "transformers") or in_room(m, "llama_cpp")]
    assert not bad, f"imports of transformers or llama_cpp outside medusa_core/backends: {bad}"


def test_core_is_free_of_serving_frameworks():
    bad = [(module_name(p), m, top) for p in sources(CORE) for m, top in imports(p)
           if any(in_room(m, f) for f in ("deployments", "fastapi", "starlette", "ray.serve"))
           or (in_room(m, "ray") and (top or "tools" not in p.relative_to(CORE).parts))]
    assert not bad, f"medusa_core importing serving frameworks (or Ray at module level / in the engine): {bad}"


def test_no_import_cycles():
    files = sources(CORE) + sources(ROOT / "deployments")
    ours = {module_name(p) for p in files}
    graph = {module_name(p): {m for m, _ in imports(p) if m in ours and m != module_name(p)} for p in files}
    for name in graph:  # a package's __init__ is imported with each of its modules: not an edge of its own
        graph[name] -= {p for p in ours if in_room(name, p)}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(trail[trail.index(nxt):] + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_a_replica_loads_none_of_the_tools():
    """What the Decoder imports (the generator and its policy) loads no tool module and no training library."""
    code = ("import sys, medusa_core.generator, medusa_core.adaptive; "
            "print(sorted(m for m in sys.modules if m.startswith(('medusa_core.tools', 'ray', 'tqdm.contrib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'ray', 'fastapi', 'starlette', 'deployments'}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import medusa_core, medusa_core.config, medusa_core.decode, medusa_core.generator, medusa_core.heads
import medusa_core.tree, medusa_core.verify, medusa_core.backends.hf, medusa_core.__main__, medusa_core.tools.commands
print('ok')
"""


def test_core_imports_with_ray_and_fastapi_blocked():
    out = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
