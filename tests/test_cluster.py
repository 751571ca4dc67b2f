"""A real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head node and a worker node, each its own
raylet with its own ports), the app deployed with `serve deploy` as on an existing cluster. A custom resource in the
serve config puts the Decoder replicas on the worker node while the Ingress (and Serve's proxy) stay on the head;
requests succeed; when the worker node's raylet dies, requests fail fast with 503 + Retry-After; when a node with the
resource comes back, the app serves again."""
from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from serve_harness import DASHBOARD, FAST_METRICS, MODEL, REPO, dashboard_get, serve_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PORT = 8126
URL = f"http://127.0.0.1:{PORT}"
# How fast the head notices a node is gone (Ray's defaults: a check every 3 s, dead after 5 failures, ~15 s); a request
# routed to a dead node's replica waits that long. The README's cluster setup sets the same.
NODE_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
               "RAY_health_check_failure_threshold": "3"}
WORKER = {"num_cpus": 2, "resources": {"worker_node": 1}, "object_store_memory": 200 * 2**20}


@pytest.fixture
def cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    for key, value in {**FAST_METRICS, **NODE_HEALTH}.items():
        monkeypatch.setenv(key, value)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head_node": 1}, "object_store_memory": 200 * 2**20, "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": int(DASHBOARD.rsplit(":", 1)[1])})
    try:
        yield cluster
    finally:
        subprocess.run([str(Path(sys.executable).parent / "serve"), "shutdown", "-y", "-a", DASHBOARD], cwd=REPO,
                       capture_output=True, timeout=120)
        cluster.shutdown()


def deploy(tmp_path: Path) -> None:
    cfg = serve_config(PORT, decoder={"ray_actor_options": {"resources": {"worker_node": 0.5}},
                                      "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
                       ingress={"ray_actor_options": {"resources": {"head_node": 0.01}}})
    path = tmp_path / "cluster_serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(path), "-a", DASHBOARD],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def complete(timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{URL}/v1/completions", json={"model": MODEL, "prompt": "The capital of France is",
                                                     "max_tokens": 8, "temperature": 0}, timeout=timeout)


def wait_serving(timeout_s: float) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (r := complete()).status_code == 200 or time.monotonic() > deadline:
                return r
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def replicas_by_node() -> dict[str, set[str]]:
    app = dashboard_get("/api/serve/applications/").json()["applications"]["medusa"]
    return {name: {r["node_id"] for r in d["replicas"] if r["state"] == "RUNNING"}
            for name, d in app["deployments"].items()}


def test_decoders_on_the_worker_node_and_back_after_it_dies(cluster, tmp_path):
    worker = cluster.add_node(**WORKER)
    cluster.wait_for_nodes()
    deploy(tmp_path)
    first = wait_serving(300)
    assert first.status_code == 200, first.text
    placed = replicas_by_node()
    assert placed["Decoder"] == {worker.node_id}, placed
    assert placed["Ingress"] == {cluster.head_node.node_id}, placed
    with ThreadPoolExecutor(4) as pool:  # a few at once: batching across the nodes' boundary
        assert all(r.status_code == 200 for r in pool.map(lambda _: complete(), range(4)))

    cluster.remove_node(worker, allow_graceful=False)  # the worker's raylet and everything on it die
    answers, deadline = [], time.monotonic() + 20
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            r = complete(timeout=30)
            code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
            answers.append((r.status_code, round(time.monotonic() - start, 2), r.headers.get("retry-after"), code))
        except httpx.TimeoutException:
            answers.append(("timeout", round(time.monotonic() - start, 2), None, None))
        time.sleep(0.5)
    print(f"after the worker node died: {answers}")
    # A request sent while the replica's process still runs may finish (200) or lose it (503 replica_failed); one
    # routed to it as it dies waits until the head notices (~3 s of health checks here, longer on a loaded machine),
    # never the minutes it used to. Once the controller counts no replica, each answer is an immediate 503 no_replica.
    # Never a 500, a timeout or a cut connection.
    assert all(status == 200 or (status == 503 and retry) for status, _, retry, _ in answers), answers
    assert all(took < 15 for _, took, _, _ in answers), answers
    first = next((i for i, (*_, code) in enumerate(answers) if code == "no_replica"), None)
    assert first is not None, answers
    assert all(code == "no_replica" and took < 2 for _, took, _, code in answers[first + 1:]), answers

    back = cluster.add_node(**WORKER)
    start = time.monotonic()
    again = wait_serving(300)
    print(f"a new worker node: serving again after {time.monotonic() - start:.1f} s")
    assert again.status_code == 200, again.text
    assert replicas_by_node()["Decoder"] == {back.node_id}
