"""Start the real Ray Serve app with `serve run` on a copy of serve_config.yaml, and talk to it over HTTP.

The copy changes only what a test needs (port, autoscaling delays, queue bounds); everything else is the shipped
file. The autoscaling metrics are pushed every 0.5 s instead of 10 s so scaling is observable in a test, and Ray's
metrics are exported every second instead of ten so a gauge's change is too. Ray runs with token authentication on,
as users run it (the venv's defaults, .ci/install): the dashboard's REST API gets the token header, `serve deploy`
finds the token itself.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = "http://127.0.0.1:8265"
MODEL = "smollm2-135m-instruct"
SERVED_CONFIG = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]["config"]
FAST_METRICS = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_metrics_report_interval_ms": "1000",
}


def ray_token() -> str:
    """The Ray auth token where Ray looks for it: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names (the venv
    points it at .cache/ray/auth_token), else ~/.ray/auth_token."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.is_file() or not (token := path.read_text().strip()):
        raise RuntimeError(f"no Ray auth token in {path}: run `bash .ci/install`")
    return token


def dashboard_get(path: str) -> httpx.Response:
    """GET the dashboard's REST API with the token, as its clients must (`Authorization: Bearer <token>`)."""
    r = httpx.get(f"{DASHBOARD}{path}", headers={"Authorization": f"Bearer {ray_token()}"}, timeout=10)
    r.raise_for_status()
    return r


def serve_config(port: int, decoder: dict | None = None, config: str | None = None,
                 ingress: dict | None = None) -> dict:
    """serve_config.yaml with the HTTP port changed and the Decoder's and Ingress's settings updated."""
    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    cfg["http_options"]["port"] = port
    if config is not None:
        cfg["applications"][0]["args"]["config"] = config
    return _with_options(_with_options(cfg, "Decoder", decoder or {}), "Ingress", ingress or {})


def deployment(cfg: dict, name: str) -> dict:
    """The settings of the deployment called `name` in a serve config."""
    return next(d for d in cfg["applications"][0]["deployments"] if d["name"] == name)


def _with_options(cfg: dict, name: str, options: dict) -> dict:
    """A copy of `cfg` with the named deployment's settings updated from `options` (dicts merged one level deep)."""
    cfg = copy.deepcopy(cfg)
    dep = deployment(cfg, name)
    for key, value in options.items():
        dep[key] = {**dep[key], **value} if isinstance(value, dict) and key in dep else value
    return cfg


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    config: dict

    def redeploy(self, decoder: dict, config: str | None = None, ingress: dict | None = None) -> None:
        """`serve deploy` this server's config with the Decoder's and Ingress's settings (and the model config)
        changed; wait until it runs."""
        cfg = _with_options(_with_options(self.config, "Decoder", decoder), "Ingress", ingress or {})
        if config is not None:
            cfg["applications"][0]["args"]["config"] = config
        path = self.log.with_name("redeploy.yaml")
        path.write_text(yaml.safe_dump(cfg))
        serve = Path(sys.executable).parent / "serve"
        subprocess.run([str(serve), "deploy", str(path), "-a", DASHBOARD], check=True, cwd=REPO, timeout=120,
                       env={**os.environ, **FAST_METRICS}, capture_output=True)
        time.sleep(2)  # let the controller pick the new config up before reading its status
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            app = dashboard_get("/api/serve/applications/").json()["applications"]["medusa"]
            if app["status"] == "RUNNING" and app["deployments"]["Decoder"]["status"] == "HEALTHY":
                return
            time.sleep(0.5)
        raise RuntimeError("redeploy did not finish")

    def stop(self) -> None:
        """Ctrl-C `serve run`: it shuts Serve down and, having started the local Ray cluster, stops it too."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def decoder_replicas(self) -> dict[str, int]:
        """Replica count per state of the Decoder deployment, from the dashboard's Serve API."""
        apps = dashboard_get("/api/serve/applications/").json()["applications"]
        replicas = apps["medusa"]["deployments"]["Decoder"]["replicas"]
        states: dict[str, int] = {}
        for r in replicas:
            states[r["state"]] = states.get(r["state"], 0) + 1
        return states

    def decoder_pids(self) -> list[int]:
        apps = dashboard_get("/api/serve/applications/").json()["applications"]
        return [r["pid"] for r in apps["medusa"]["deployments"]["Decoder"]["replicas"] if r["state"] == "RUNNING"]

    def wait_for_replicas(self, want: dict[str, int], timeout_s: float = 120) -> dict[str, int]:
        """Poll until the Decoder's replica states equal `want` (or time runs out); return the last states."""
        deadline = time.monotonic() + timeout_s
        while (states := self.decoder_replicas()) != want and time.monotonic() < deadline:
            time.sleep(1)
        return states


def ray_metrics(name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's series (those with `labels`) over Ray's metrics endpoints, found as a
    Prometheus server finds them: the service-discovery file of the latest Ray session (the tests' cluster; tests
    that start Ray run one at a time). 0.0 when no series exists yet."""
    session = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "session_latest"
    targets = json.loads((session / "prom_metrics_service_discovery.json").read_text())
    total = 0.0
    for group in targets:
        for target in group["targets"]:
            for line in httpx.get(f"http://{target}/metrics", timeout=10).text.splitlines():
                metric, _, rest = line.partition("{")  # name{label="value",...} value
                tags, _, value = rest.rpartition("}")
                if metric == name and all(f'{k}="{v}"' in tags for k, v in labels.items()):
                    total += float(value.split()[0])
    return total


def post(server: Server, path: str, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=timeout)


def complete(server: Server, prompt: str, max_tokens: int, **extra) -> dict:
    """A greedy completion that must succeed; returns the response body."""
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                         "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def start_server(cfg: dict, workdir: Path, timeout_s: float = 300) -> Server:
    path = workdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = workdir / "serve.log"
    serve = Path(sys.executable).parent / "serve"
    process = subprocess.Popen([str(serve), "run", str(path)], cwd=REPO, env={**os.environ, **FAST_METRICS},
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{cfg['http_options']['port']}", process, log, cfg)
    try:
        wait_healthy(process, log, server.url, timeout_s)
    except RuntimeError:
        server.stop()
        raise
    return server


def wait_healthy(process: subprocess.Popen, log: Path, url: str, timeout_s: float) -> None:
    """Poll `url`/health until it answers 200; RuntimeError with the log's tail if the process exits first or time
    runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"not healthy after {timeout_s} s:\n{log.read_text()[-4000:]}")
