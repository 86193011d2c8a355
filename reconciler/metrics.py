"""Prometheus metrics of the daemon (`reconcile PATH --metrics HOST:PORT`).

Beside the loop: it only counts what each pass reports. Imported in watch mode
with --metrics only, so other commands do not pay for prometheus_client.
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector

from reconciler.loop import Outcome, Report
from reconciler.plan import Kind

STATES = ("running", "paused", "starting", "ready", "unready", "saved", "stopped",
          "exited", "crash-loop")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # RSS, open fds, CPU of the daemon
        self.vms = Gauge("reconciler_vms", "Managed VMs by state", ["state"],
                         registry=self.registry)
        self.actions = Counter("reconciler_actions", "Actions applied, by kind and result",
                               ["kind", "result"], registry=self.registry)
        self.passes = Counter("reconciler_passes", "Reconcile passes run",
                              registry=self.registry)
        self.pass_seconds = Histogram(
            "reconciler_pass_duration_seconds", "Time one reconcile pass took",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry)
        self.restarts = Counter("reconciler_restarts",
                                "Automatic restarts of VMs after their process ended",
                                ["reason"], registry=self.registry)
        self.manifest_errors = Gauge("reconciler_manifest_errors",
                                     "Manifest and state errors in the last pass",
                                     registry=self.registry)
        for state in STATES:
            self.vms.labels(state=state)
        # A cluster member's (--etcd): the cluster as this member last read it.
        self.hosts = Gauge("reconciler_hosts", "Cluster hosts by lease state", ["state"],
                           registry=self.registry)
        self.placements = Counter("reconciler_placements",
                                  "VMs placed by this member while it was the scheduler",
                                  ["kind"], registry=self.registry)
        self.unschedulable = Gauge("reconciler_unschedulable",
                                   "VMs no live host takes", registry=self.registry)
        self._counted = {"placed": 0, "failover": 0}

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)

    def observe_cluster(self, hosts: dict[str, int], unschedulable: int, *, placed: int,
                        failovers: int) -> None:
        """hosts: how many are alive, lost, draining; placed/failovers: this member's
        scheduler's totals so far."""
        for state in ("alive", "lost", "draining"):
            self.hosts.labels(state=state).set(hosts.get(state, 0))
        self.unschedulable.set(unschedulable)
        for kind, total in (("placed", placed), ("failover", failovers)):
            if total > self._counted[kind]:
                self.placements.labels(kind=kind).inc(total - self._counted[kind])
                self._counted[kind] = total

    def observe(self, report: Report, seconds: float) -> None:
        self.passes.inc()
        self.pass_seconds.observe(seconds)
        self.manifest_errors.set(len(report.errors))
        tally = Tally(report.states.values())
        for state in set(STATES) | set(tally):
            self.vms.labels(state=state).set(tally.get(state, 0))
        for result in report.results:
            if result.action is Kind.NONE:
                continue
            self.actions.labels(kind=result.action.value, result=result.outcome.value).inc()
            if result.outcome is Outcome.CHANGED and result.after is not None:
                self.restarts.labels(reason=result.after).inc()
