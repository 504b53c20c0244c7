"""One /metrics for the whole cluster: every replica publishes its Prometheus text to a shared board, and
whichever replica answers /metrics merges all of them, each sample labelled with the replica that made it."""

from __future__ import annotations

import time

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

PUBLISH_SECONDS = 1.0  # how stale another replica's numbers can be in a scrape
FORGET_SECONDS = 5.0  # a replica silent this long is gone (killed or scaled down): its series are dropped


class MetricsBoard:
    """The latest exposition of each replica; a Ray actor shared by all replicas of the deployment."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[float, bytes]] = {}

    def put(self, replica: str, text: bytes) -> None:
        self._texts[replica] = (time.monotonic(), text)

    def drop(self, replica: str) -> None:
        self._texts.pop(replica, None)

    def current(self) -> dict[str, bytes]:
        now = time.monotonic()
        self._texts = {r: (t, text) for r, (t, text) in self._texts.items() if now - t <= FORGET_SECONDS}
        return {r: text for r, (_, text) in self._texts.items()}


class _Merged:
    """A prometheus_client collector over already-built families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge(texts: dict[str, bytes]) -> bytes:
    """One exposition: each replica's samples with a `replica` label, one family per metric name,
    plus `verispec_replicas`, the number of replicas that reported."""
    from prometheus_client import CollectorRegistry, generate_latest

    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
    count = Metric("verispec_replicas", "Replicas whose metrics are in this scrape", "gauge")
    count.add_sample("verispec_replicas", {}, float(len(texts)))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged([count, *families.values()]))
    return generate_latest(registry)
