"""The switch's own counters and histograms expose exactly what prometheus_client's would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as ReferenceCounter
from prometheus_client import Histogram as ReferenceHistogram

from switch.metrics import LATENCY_BUCKETS, Counter, Histogram


def _exposition(registry: CollectorRegistry) -> list[str]:
    # prometheus_client adds `_created` timestamps, which ours leave out on purpose
    return sorted(line for line in generate_latest(registry).decode().splitlines()
                  if "_created" not in line)


def test_same_exposition_as_prometheus_client() -> None:
    ours, reference = CollectorRegistry(), CollectorRegistry()
    for counter, histogram, registry in ((Counter, Histogram, ours),
                                         (ReferenceCounter, ReferenceHistogram, reference)):
        labelled = counter("gridpay_t_total", "a labelled counter", ["a", "b"],
                           registry=registry)
        labelled.labels("x", "y").inc()
        labelled.labels("x", "y").inc(2.5)
        labelled.labels("x", "z").inc()
        counter("gridpay_u", "a plain counter", registry=registry).inc()
        latency = histogram("gridpay_t_seconds", "a histogram", ["m"], registry=registry,
                            buckets=LATENCY_BUCKETS)
        # on a bound, between bounds, below the first and above the last
        for value in (0.0005, 0.001, 0.003, 0.0025, 7.0, 5.0):
            latency.labels("q").observe(value)
        sizes = histogram("gridpay_t_size", "integer buckets", registry=registry,
                          buckets=(1, 2, 4))
        for value in (1, 3, 9):
            sizes.observe(value)
    assert _exposition(ours) == _exposition(reference)
    assert ours.get_sample_value("gridpay_t_seconds_bucket", {"m": "q", "le": "0.001"}) == 2.0
    assert ours.get_sample_value("gridpay_t_total", {"a": "x", "b": "y"}) == 3.5


def test_misuse_is_refused() -> None:
    registry = CollectorRegistry()
    counter = Counter("gridpay_v_total", "doc", ["a"], registry=registry)
    with pytest.raises(ValueError, match="labels"):
        counter.labels("1", "2")
    with pytest.raises(ValueError, match="needs its labels"):
        counter.inc()
    with pytest.raises(ValueError, match="only go up"):
        counter.labels("1").inc(-1)
    with pytest.raises(ValueError, match="increasing"):
        Histogram("gridpay_w_seconds", "doc", buckets=(2, 1))
    with pytest.raises(ValueError):  # the same name twice in one registry
        Counter("gridpay_v_total", "doc", ["a"], registry=registry)
