"""Custom Ray Serve metrics of the decoder replicas (shown in the Ray dashboard, exported to Prometheus).

Ray prefixes custom metrics with `ray_` and adds the deployment, replica and application tags; the README lists the
exported names. Tokens, steps and acceptance are recorded after every step (a long request shows up while it runs);
each request's ending (stop, length, cancelled, timeout, error), time to first token, rate and queue wait when it
ends, whether or not it produced stats; the two gauges between steps. The decode loop itself stays free of metrics.
"""
from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from medusa_core.request import Stats

LATENCY_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
RATE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
BATCH = [1, 2, 3, 4, 6, 8, 12, 16, 32, 64]


class DecoderMetrics:
    def __init__(self, max_depth: int) -> None:
        """`max_depth`: the deepest speculation the tree allows (0 for a model without heads: plain decoding)."""
        tags = ("model", "mode")
        self.requests = Counter("medusa_requests", "Finished requests.", tag_keys=(*tags, "finish_reason"))
        self.tokens = Counter("medusa_generated_tokens", "Generated tokens.", tag_keys=tags)
        self.steps = Counter("medusa_decode_steps", "Decode steps (verify passes).", tag_keys=tags)
        self.accepted = Counter("medusa_accepted_tokens", "Speculated tokens accepted, by head position (1 = head 0).",
                                tag_keys=(*tags, "head"))
        self.accept_len = Histogram("medusa_accept_length", "Speculated tokens accepted per decode step.",
                                    boundaries=[d + 0.5 for d in range(max(1, max_depth))], tag_keys=tags)
        self.tree_nodes = Counter("medusa_tree_steps", "Batch decode steps by the tree nodes each row verified "
                                  "(1 = plain decoding): the adaptive tree's choice.", tag_keys=("model", "nodes"))
        self.batch_size = Histogram("medusa_batch_size", "Requests decoded together in one batch.",
                                    boundaries=BATCH, tag_keys=("model",))
        self.ttft = Histogram("medusa_time_to_first_token_seconds", "Time to first token (in the replica).",
                              boundaries=LATENCY_S, tag_keys=tags)
        self.rate = Histogram("medusa_request_tokens_per_second", "Per-request generated tokens per second.",
                              boundaries=RATE, tag_keys=tags)
        # Per replica (Ray adds the replica tag): rows decoding in the running batch and requests waiting to join
        # it. Ray's own ongoing-request count drops when a caller goes away; a row that kept decoding after its
        # caller left would show only here.
        self.running = Gauge("medusa_running_requests", "Requests decoding in the replica's running batch (rows).",
                             tag_keys=("model",))
        self.waiting = Gauge("medusa_waiting_requests", "Requests in the replica waiting to join the running batch.",
                             tag_keys=("model",))
        self.queue_wait = Histogram("medusa_queue_wait_seconds", "From the ingress receiving a request to its "
                                    "batch starting to decode.", boundaries=LATENCY_S, tag_keys=tags)

    def record_batch(self, model: str, size: int, tree_nodes: int) -> None:
        self.batch_size.observe(size, tags={"model": model})
        if tree_nodes > 0:  # 0: the step only admitted requests (a prefill)
            self.tree_nodes.inc(tags={"model": model, "nodes": str(tree_nodes)})

    def record_load(self, model: str, running: int, waiting: int) -> None:
        self.running.set(running, tags={"model": model})
        self.waiting.set(waiting, tags={"model": model})

    def record_steps(self, model: str, mode: str, tokens: int, accept_lens: list[int]) -> None:
        """One decode step's rows of one mode: tokens emitted, and speculated tokens accepted per row (decode steps
        only; the prefill's first token has none)."""
        tags = {"model": model, "mode": mode}
        if tokens > 0:  # Ray counters refuse increments of 0
            self.tokens.inc(tokens, tags=tags)
        if accept_lens:
            self.steps.inc(len(accept_lens), tags=tags)
        for k in range(max(accept_lens, default=0)):
            self.accepted.inc(sum(a > k for a in accept_lens), tags={**tags, "head": str(k + 1)})
        for a in accept_lens:
            self.accept_len.observe(a, tags=tags)

    def record_request(self, model: str, mode: str, finish_reason: str, stats: Stats | None = None) -> None:
        """A request's ending; its latencies when it decoded (a request that timed out or failed while waiting has
        none)."""
        tags = {"model": model, "mode": mode}
        self.requests.inc(tags={**tags, "finish_reason": finish_reason})
        if stats is not None:
            self.ttft.observe(stats.time_to_first_token_s, tags=tags)
            self.rate.observe(stats.tokens_per_second, tags=tags)
            self.queue_wait.observe(stats.queue_wait_s, tags=tags)
