"""The server's Prometheus metrics (``GET /metrics``): requests by status, queue depth, batch sizes, latency
histograms and images/s. One :class:`Metrics` per gateway, each with its own registry (no process-global one)."""

from __future__ import annotations

import collections
import time

RATE_WINDOW_S = 60.0  # images/s is counted over this window
LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
SEEN_BATCHES = 4096  # batch ids remembered, so a batch shared by several requests is counted once


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("diffrt_requests", "HTTP requests to the images endpoint, by status code",
                                ["code"], registry=self.registry)  # fmt: skip
        self.queue = Gauge("diffrt_queue_depth", "requests accepted and not yet answered", registry=self.registry)
        self.latency = Histogram("diffrt_request_latency_seconds", "time from a request's arrival to its answer "
                                 "(answers with images)", buckets=LATENCY_BUCKETS_S,
                                 registry=self.registry)  # fmt: skip
        self.queue_wait = Histogram("diffrt_queue_wait_seconds", "time a request waited before its batch started",
                                    buckets=LATENCY_BUCKETS_S, registry=self.registry)  # fmt: skip
        self.batch_images = Histogram("diffrt_batch_images", "images per pipeline call", buckets=BATCH_BUCKETS,
                                      registry=self.registry)  # fmt: skip
        self.batch_requests = Histogram("diffrt_batch_requests", "requests per pipeline call", buckets=BATCH_BUCKETS,
                                        registry=self.registry)  # fmt: skip
        self.images = Counter("diffrt_images", "images generated", registry=self.registry)
        self.retries = Counter("diffrt_replica_retries", "requests sent again because their replica died",
                               registry=self.registry)  # fmt: skip
        Gauge("diffrt_images_per_second", f"images answered per second over the last {RATE_WINDOW_S:.0f} s",
              registry=self.registry).set_function(self.images_per_second)  # fmt: skip
        self.mean_latency_s: float | None = None  # of the answers with images so far: the 503's Retry-After
        self._answers = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, images) per answer
        self._batches: collections.OrderedDict[str, None] = collections.OrderedDict()

    def answered(self, code: int, seconds: float | None = None, batch: dict | None = None, images: int = 0) -> None:
        """Count one answer; one with images also records its latency, its wait and its batch (once per batch)."""
        self.requests.labels(code=str(code)).inc()
        if not images:
            return
        self.latency.observe(seconds)
        self._answers += 1
        self.mean_latency_s = (self.mean_latency_s or 0.0) + (seconds - (self.mean_latency_s or 0.0)) / self._answers
        self.images.inc(images)
        self._recent.append((time.monotonic(), images))
        self.queue_wait.observe(batch["queue_ms"] / 1000)
        if batch["id"] not in self._batches:
            self._batches[batch["id"]] = None
            if len(self._batches) > SEEN_BATCHES:
                self._batches.popitem(last=False)
            self.batch_images.observe(batch["images"])
            self.batch_requests.observe(batch["requests"])

    def images_per_second(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        return sum(images for _, images in self._recent) / RATE_WINDOW_S

    def text(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
