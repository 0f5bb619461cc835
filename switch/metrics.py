"""Prometheus metrics of one node, in its own registry (no module-level state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LabelCache:
    """`cache(metric, *values)` is `metric.labels(*values)`, looked up once: the hot paths
    call it per request, and prometheus_client's `labels()` validates and takes a lock on
    every call."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def __call__(self, metric: Any, *values: str) -> Any:
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.child = LabelCache()
        self.role = Gauge("gridpay_node_active", "1 when this node holds the lease", registry=r)
        self.epoch = Gauge("gridpay_lease_epoch", "lease epoch held by this node", registry=r)
        self.http_requests = Counter("gridpay_http_requests_total", "HTTP requests",
                                     ["route", "status"], registry=r)
        self.http_latency = Histogram("gridpay_http_request_seconds", "HTTP latency", ["route"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.payments = Counter("gridpay_payments_total", "payments approved", ["channel"],
                                registry=r)
        self.reversals = Counter("gridpay_reversals_total", "reversals done", ["channel"],
                                 registry=r)
        self.group_commit_size = Histogram(
            "gridpay_group_commit_size", "postings per database transaction",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.group_commit_latency = Histogram(
            "gridpay_group_commit_seconds", "time of one group commit", buckets=LATENCY_BUCKETS,
            registry=r)
        self.outbox_pending = Gauge("gridpay_outbox_pending", "postings waiting to be forwarded",
                                    registry=r)
        self.outbox_dead = Gauge("gridpay_outbox_dead", "postings in the dead-letter state",
                                 registry=r)
        self.forwarded = Counter("gridpay_forwarded_total", "postings forwarded", ["result"],
                                 registry=r)
        self.link_connections = Gauge("gridpay_link_connections", "open ISO 8583 connections",
                                      ["institution"], registry=r)
        self.link_transactions = Counter("gridpay_link_transactions_total",
                                         "ISO 8583 requests answered",
                                         ["institution", "mti", "response_code"], registry=r)
        self.link_latency = Histogram("gridpay_link_request_seconds", "ISO 8583 request latency",
                                      ["institution", "mti"], buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.link_errors = Counter("gridpay_link_errors_total",
                                   "malformed, unmatched or oversize frames", ["dialect", "kind"],
                                   registry=r)
        self.ivr_turns = Counter("gridpay_ivr_turns_total", "IVR dialog turns", ["step"],
                                 registry=r)
        self.redemptions = Counter("gridpay_card_redemptions_total", "cards redeemed",
                                   registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
