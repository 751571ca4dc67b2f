"""Nothing the service starts answers the network without Ray's token (README "Security").

Each way the README starts the service, `bash .ci/serve` and the plain `.venv/bin/serve run serve_config.yaml`, runs
from an environment without any RAY_* variable, as a new shell would: the venv supplies Ray's settings (.ci/install).
Every socket its processes listen on (the command's process tree and the Ray session it started) must be on loopback
or refuse a request that carries no token (HTTP 401/403, gRPC UNAUTHENTICATED). On loopback too, the dashboard's REST
API, the Jobs API, the Serve REST API (`serve deploy`) and the GCS must refuse a request without the token and accept
the token, while the product's HTTP API on port 8000 needs none. Both runs serve the shipped serve_config.yaml, so
ports 8000 and 8265 (and 6379 for `.ci/serve`) must be free.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest

from serve_harness import REPO, wait_healthy

pytestmark = pytest.mark.ray
BIN = Path(sys.executable).parent
DASHBOARD = "http://127.0.0.1:8265"
API = "http://127.0.0.1:8000"
WAYS = {
    ".ci/serve": (["bash", ".ci/serve"], (8000, 8265, 6379), 900),  # command, ports it takes, seconds to healthy
    "serve run": ([str(BIN / "serve"), "run", "serve_config.yaml"], (8000, 8265), 300),
}
# One read-only method of each gRPC service Ray runs: an unknown method answers UNIMPLEMENTED before any token check,
# so only a real one shows whether a server asks for the token.
GRPC_METHODS = [
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",  # GCS
    "/ray.rpc.NodeManagerService/GetNodeStats",  # raylet
    "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",  # every worker: drivers, actors, replicas
    "/ray.rpc.ReporterService/HealthCheck",  # dashboard agent
    "/ray.rpc.LogService/ListLogs",  # dashboard agent
    "/ray.rpc.RayletDriver/ClusterInfo",  # Ray Client server
    "/ray.serve.ASGIService/HandleRequest",  # Serve replicas' inter-deployment server
    "/ray.rpc.ObjectManagerService/Pull",  # raylet's object manager (no read-only method; asked last)
]


def fresh_env() -> dict[str, str]:
    """This environment without RAY_* variables (pytest's conftest sets some): what a new shell has."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def service_token() -> str:
    """The token the service runs with: what `ray get-auth-token` prints in the same bare environment."""
    out = subprocess.run([str(BIN / "ray"), "get-auth-token"], cwd=REPO, env=fresh_env(), capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip()


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def service_processes(root: psutil.Process, since: float) -> set[psutil.Process]:
    """The command's process tree and the Ray session it started. `ray start` (in .ci/serve) exits once GCS, raylet,
    dashboard and Ray Client server run, so they belong to no tree of ours: they are the processes started since then
    whose command line names the session directory or this venv (the Ray Client server names neither session nor
    temp dir), and Ray's workers and agents are their children."""
    tree = {root, *root.children(recursive=True)}
    new_gcs = [p for p in psutil.process_iter(["name", "cmdline", "create_time"])
               if p.info["name"] == "gcs_server" and p.info["create_time"] >= since]
    assert len(new_gcs) == 1, f"expected the one GCS this run started, found {len(new_gcs)}: another Ray cluster?"
    session = next(part for arg in new_gcs[0].info["cmdline"] for part in Path(arg).parts
                   if part.startswith("session_"))
    members = set(tree)
    for p in psutil.process_iter(["cmdline", "create_time"]):
        if p.info["create_time"] >= since and any(session in arg or sys.prefix in arg
                                                  for arg in p.info["cmdline"] or ()):
            try:
                members |= {p, *p.children(recursive=True)}
            except psutil.NoSuchProcess:  # a short-lived helper that has exited since
                pass
    return members


def listening(procs: set[psutil.Process]) -> list:
    """Every TCP socket the processes listen on and every UDP socket they bound (a UDP server has no listen state)."""
    pids = {p.pid for p in procs}
    return [c for c in psutil.net_connections("inet") if c.pid in pids
            and (c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr))]


def on_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket's IPv4 loopback
    return (mapped or addr).is_loopback


def probe_address(ip: str, port: int) -> str:
    """Where to ask: a wildcard bind is the same socket on loopback; a specific address as it is."""
    if ip in ("0.0.0.0", "::"):
        ip = "127.0.0.1" if ip == "0.0.0.0" else "::1"
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def grpc_call(address: str, method: str, token: str | None = None) -> grpc.StatusCode:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary(method)(b"", timeout=5, metadata=metadata)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def refusal(conn) -> str | None:
    """How the socket refuses a request without the token, or None where it does not (or cannot be asked)."""
    if conn.type == socket.SOCK_DGRAM:
        return None
    address = probe_address(conn.laddr.ip, conn.laddr.port)
    try:
        status = httpx.get(f"http://{address}/api/version", timeout=5).status_code
        return f"HTTP {status}" if status in (401, 403) else None
    except httpx.HTTPError:
        pass  # not HTTP/1.1: gRPC servers speak HTTP/2 only
    for method in GRPC_METHODS:
        code = grpc_call(address, method)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return "gRPC UNAUTHENTICATED"
        if code != grpc.StatusCode.UNIMPLEMENTED:
            return None  # it answered (or failed) without asking for a token
    return None


def stop(proc: subprocess.Popen, procs: set[psutil.Process]) -> None:
    """Ctrl-C, as a user stops it: `serve run` shuts Serve down and stops the cluster it started; .ci/serve's trap
    runs `ray stop`. Whatever of this run is left after that is ended by its pid, so the suite goes on clean."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _, alive = psutil.wait_procs(list(procs), timeout=30)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    # As .ci/serve's trap does: `ray stop` also removes /tmp/ray/ray_current_cluster, which a plain `serve run`
    # would otherwise follow to the cluster that is gone, retrying forever.
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=fresh_env(), capture_output=True, timeout=120)


@pytest.mark.parametrize("way", list(WAYS))
def test_no_listener_beyond_loopback_answers_without_the_token(way, tmp_path):
    command, ports, timeout_s = WAYS[way]
    taken = [port for port in ports if port_taken(port)]
    assert not taken, f"ports {taken} are in use: stop the server or Ray cluster holding them, then re-run"
    log = tmp_path / "service.log"
    since = time.time() - 1  # create_time has a resolution of one clock tick
    proc = subprocess.Popen(command, cwd=REPO, env=fresh_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    procs: set[psutil.Process] = set()
    try:
        wait_healthy(proc, log, API, timeout_s)
        procs = service_processes(psutil.Process(proc.pid), since)
        sockets = listening(procs)
        names = {c.pid: p.name() for p in procs for c in sockets if c.pid == p.pid}
        rows, open_ = [], []
        for c in sorted(sockets, key=lambda c: (c.laddr.port, c.laddr.ip)):
            verdict = "loopback" if on_loopback(c.laddr.ip) else refusal(c)
            rows.append(f"{c.laddr.ip}:{c.laddr.port} {names.get(c.pid)} (pid {c.pid}): {verdict or 'OPEN'}")
            if verdict is None:
                open_.append(rows[-1])
        table = "\n".join(rows)
        print(f"{way}: {len(sockets)} listening sockets\n{table}")
        # The listing must hold what we know runs, or an empty listing would pass.
        by_port = {c.laddr.port: names.get(c.pid) for c in sockets}
        assert 8000 in by_port and 8265 in by_port, f"the proxy or the dashboard is missing from the listing:\n{table}"
        gcs = [c for c in sockets if names.get(c.pid) == "gcs_server"]
        assert gcs and any(names.get(c.pid) == "raylet" for c in sockets), f"GCS or raylet missing:\n{table}"
        assert not open_, "listening beyond loopback without asking for a token:\n" + "\n".join(open_)

        # Token auth is on, on loopback too: no token, no dashboard, Jobs API, Serve REST API or GCS.
        token = service_token()
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{DASHBOARD}/api/version", timeout=10).status_code == 401
        assert httpx.get(f"{DASHBOARD}/api/version", headers=auth, timeout=10).status_code == 200
        assert httpx.post(f"{DASHBOARD}/api/jobs/", json={"entrypoint": "true"}, timeout=10).status_code == 401
        assert httpx.get(f"{DASHBOARD}/api/serve/applications/", timeout=10).status_code == 401
        apps = httpx.get(f"{DASHBOARD}/api/serve/applications/", headers=auth, timeout=10).json()["applications"]
        assert apps["medusa"]["status"] == "RUNNING"
        gcs_address = probe_address(gcs[0].laddr.ip, gcs[0].laddr.port)
        assert grpc_call(gcs_address, GRPC_METHODS[0]) == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_call(gcs_address, GRPC_METHODS[0], token) == grpc.StatusCode.OK
        assert httpx.get(f"{API}/health", timeout=10).status_code == 200  # the product's API needs no Ray token

        if way == ".ci/serve":  # `serve deploy` as the README gives it: the venv's token works, a wrong one does not
            deploy = [str(BIN / "serve"), "deploy", "serve_config.yaml"]
            wrong = subprocess.run(deploy, cwd=REPO, env={**fresh_env(), "RAY_AUTH_TOKEN": "0" * 64},
                                   capture_output=True, text=True, timeout=120)
            assert wrong.returncode != 0 and "Authentication failed" in wrong.stdout + wrong.stderr, wrong
            right = subprocess.run(deploy, cwd=REPO, env=fresh_env(), capture_output=True, text=True, timeout=120)
            assert right.returncode == 0, right
    finally:
        stop(proc, procs)
    if way == ".ci/serve":  # the first hour: no re-install, one ready line, quiet start and stop
        text = log.read_text()
        assert "installed into .venv" not in text, "a restart re-ran .ci/install though nothing changed"
        assert "medusa-serve ready at http://127.0.0.1:8000 (model smollm2-135m-instruct, backend llamacpp" in text
        assert "Ray started: dashboard http://127.0.0.1:8265" in text and "Ray stopped" in text
        assert "Stopped all" not in text and "Local node IP" not in text, "ray start/stop output on the terminal"
