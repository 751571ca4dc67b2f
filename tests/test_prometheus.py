"""Prometheus and Grafana, for real: a Prometheus server (Debian's `prometheus`, installed by .ci/install) scrapes the
served app's Ray metrics endpoints, found the way Ray documents (its service-discovery file). After a few requests,
every custom metric the README lists has data in Prometheus (counters and histograms non-zero), and every panel query
of the Grafana dashboard (`deployments/grafana/medusa.json`) returns data."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from serve_harness import MODEL, REPO, complete, post

pytestmark = pytest.mark.ray
DASHBOARD = REPO / "deployments" / "grafana" / "medusa.json"
PROMPTS = ["The capital of France is", "1, 1, 2, 3, 5,", "Roses are red,", "def add(a, b):\n"]


def readme_metrics() -> dict[str, str]:
    """The custom metrics the README's Observability table lists: name -> type."""
    rows = re.findall(r"^\| `(ray_medusa_\w+)` \| (counter|histogram|gauge) \|", (REPO / "README.md").read_text(), re.M)
    assert len(rows) >= 10, rows
    return dict(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "no `prometheus` on PATH: `bash .ci/install` installs Debian's package"
    folder = tmp_path_factory.mktemp("prometheus")
    session = (Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "session_latest").resolve()
    targets = session / "prom_metrics_service_discovery.json"  # Ray keeps it current as nodes come and go
    (folder / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [str(targets)],
                                                                    "refresh_interval": "2s"}]}]}))
    url = f"http://127.0.0.1:{free_port()}"
    log = (folder / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={folder / 'prometheus.yml'}",
                             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address={url[7:]}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready(url):
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list[float]:
    """The values of an instant PromQL query (NaN where a ratio had nothing to divide)."""
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", (expr, r)
    return [float(sample["value"][1]) for sample in r["data"]["result"]]


def wait_for(url: str, exprs: dict[str, str], ok, timeout_s: float = 90) -> dict[str, list[float]]:
    """Query every expression until `ok(values)` holds for all, or the time is up; the last values of each."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = {name: query(url, expr) for name, expr in exprs.items()}
        if all(ok(v) for v in values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(1)


def drive(server) -> None:
    """Requests that touch every metric: concurrent Medusa requests (batches, speculation), a plain one, a 4xx."""
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        list(pool.map(lambda p: complete(server, p, 24), PROMPTS))
    complete(server, PROMPTS[0], 8, medusa={"mode": "plain"})
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}).status_code == 400


def test_every_readme_metric_reaches_prometheus(server, prometheus):
    drive(server)
    exprs = {}
    for name, kind in readme_metrics().items():  # gauges may read 0 between requests: they must exist
        exprs[name] = {"counter": f"sum({name})", "histogram": f"sum({name}_count)", "gauge": f"count({name})"}[kind]
    values = wait_for(prometheus, exprs, lambda v: bool(v) and v[0] > 0)
    missing = {name: v for name, v in values.items() if not (v and v[0] > 0)}
    print({name: v[0] if v else None for name, v in values.items()})
    assert not missing, f"no data in Prometheus for {missing}"
    speculated = query(prometheus, 'sum(ray_medusa_accepted_tokens_total{head="1"})')
    assert speculated and speculated[0] > 0, "no accepted tokens at head position 1: nothing was speculated"


def test_every_grafana_panel_returns_data(server, prometheus):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = {f"{p['title']} / {t['refId']}": t["expr"] for p in dashboard["panels"] for t in p["targets"]}
    assert len(dashboard["panels"]) >= 9 and exprs
    drive(server)  # rate() needs two samples in its window
    values = wait_for(prometheus, exprs, lambda v: any(x == x for x in v))  # x == x: not NaN
    empty = [name for name, v in values.items() if not any(x == x for x in v)]
    assert not empty, f"panels without data: {empty}"
