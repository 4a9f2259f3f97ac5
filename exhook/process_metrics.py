"""``process_*`` metrics of several processes in one exposition.

With ``workers > 1`` the parent serves ``/metrics`` from the workers' multiprocess
files, which carry no process metrics; the memory, CPU and file descriptors that
matter are the workers'. So the parent reads them from ``/proc`` for itself and each
worker (prometheus-client's ProcessCollector, one per pid) and shows the standard
families with a ``process`` label (``supervisor``, ``worker-0``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class ProcessesCollector(Collector):
    def __init__(self, processes: Callable[[], dict[str, int]]) -> None:
        self._processes = processes  # label -> pid, asked at every scrape (workers come and go)

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for label, pid in self._processes().items():
            # registry=None: a throwaway reader of /proc/<pid>, registered nowhere
            for family in ProcessCollector(pid=_constant(pid), registry=None).collect():
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "process": label}, sample.value)
        return list(merged.values())


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid
