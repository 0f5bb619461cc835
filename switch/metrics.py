"""Prometheus metrics of one node, in its own registry (no module-level state)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# -- counters and histograms for the hot paths ---------------------------------------------------
#
# prometheus_client's Counter and Histogram take a threading lock on every inc() and observe()
# (two for an observation: the bucket and the sum); on the switch's per-payment paths that was
# a few per cent of its CPU. The switch updates its metrics from its one event loop, so these
# keep plain numbers, and a collector turns them into the same metric families when the
# registry is scraped. Same names, labels and samples as prometheus_client's own.

class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.total += value


class _Family(Collector):
    """A labelled family of children, registered in `registry` as a collector."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def describe(self) -> Iterator[Metric]:
        """The family without samples: lets the registry refuse a second metric of this name."""
        yield from self._families(with_samples=False)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        raise NotImplementedError

    def _only(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} needs its labels {self.labelnames}")
        return self._children[()]


class Counter(_Family):
    """A counter (exposed as ``NAME_total``) with `labels(...).inc()` / `inc()`."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry | None = None) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()) if with_samples else ():
            family.add_metric(list(values), child.value)
        yield family


class Histogram(_Family):
    """A histogram with `labels(...).observe(v)` / `observe(v)`."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry | None = None,
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        bounds = tuple(float(b) for b in buckets if b != float("inf"))
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("histogram buckets must be increasing")
        self.bounds = bounds
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        self._only().observe(value)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = [_le(b) for b in self.bounds] + ["+Inf"]
        for values, child in list(self._children.items()) if with_samples else ():
            running, buckets = 0, []
            for le, n in zip(les, child.counts, strict=True):
                running += n
                buckets.append((le, float(running)))
            family.add_metric(list(values), buckets, child.total)
        yield family


def _le(bound: float) -> str:
    return repr(float(bound))


class LabelCache:
    """`cache(metric, *values)` is `metric.labels(*values)`, looked up once: the hot paths
    call it per request, and `labels()` checks and converts its values on every call (a
    look-up of the values as given costs about 60 % of it: 0.30 against 0.49 µs)."""

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
        self.epoch = Gauge("gridpay_lease_epoch", "lease epoch held by this node (0: none)",
                           registry=r)
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
        self.loop_lag = Histogram(
            "gridpay_event_loop_lag_seconds", "how late the event loop ran a 50 ms timer",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
