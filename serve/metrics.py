"""Prometheus metrics of the service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Prometheus metrics on a registry of the app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("http_requests_total", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("http_request_duration_seconds", "request latency by route", ["route"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=self.registry)
        self.batch_sizes = Histogram("inference_batch_size", "images per ONNX Runtime call",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.images = Counter("images_predicted_total", "images through the model", registry=self.registry)
        self.queue_depth = Gauge("inference_queue_depth", "images waiting for a batch", registry=self.registry)
