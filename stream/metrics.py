"""Prometheus metrics of the worker (served on ISTREAM_METRICS_PORT, /metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:  # annotations only: importing them would load torch
    from models.weights_io import WeightsRejected
    from stream.records import BatchOutcome


# Freshness spans sub-second (live) to hours (a backlog after an outage).
_FRESH_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600, float("inf"))


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        r = registry
        self.events_in = Counter("istream_records_in", "Records read from the topics", ["topic"], registry=r)
        self.invalid = Counter("istream_records_invalid", "Records sent to the dead-letter topic", registry=r)
        self.applied = Counter("istream_events_applied", "Events applied to user vectors", registry=r)
        self.duplicates = Counter(
            "istream_events_duplicate", "Events skipped as already applied (event_id)", registry=r
        )
        self.retries = Counter(
            "istream_batch_retries", "Batch attempts that failed on a transient error", registry=r
        )
        self.batch_seconds = Histogram(
            "istream_batch_seconds", "Time to validate, learn and commit one batch", registry=r
        )
        self.batch_size = Histogram(
            "istream_batch_records",
            "Records per batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, float("inf")),
            registry=r,
        )
        self.freshness = Histogram(
            "istream_freshness_seconds",
            "Event time to vector committed",
            buckets=_FRESH_BUCKETS,
            registry=r,
        )
        self.produce_to_commit = Histogram(
            "istream_produce_to_commit_seconds",
            "Broker timestamp of the record to vector committed",
            buckets=_FRESH_BUCKETS,
            registry=r,
        )
        self.fetch_delay = Histogram(
            "istream_fetch_delay_seconds",
            "Broker timestamp of the record to the worker reading it",
            buckets=_FRESH_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "istream_consumer_lag",
            "Records not yet committed to Postgres",
            ["topic", "partition"],
            registry=r,
        )
        self.pending = Gauge(
            "istream_pending_records", "Records read but not yet committed (intake)", registry=r
        )
        self.loss = Gauge("istream_training_loss", "Loss of the last training step", registry=r)
        self.model_version = Gauge(
            "istream_model_version_info", "The model version vectors are written in", ["version"], registry=r
        )
        self.weights_refused = Counter(
            "istream_weights_refused",
            "Published model weights refused on load (kind: format, checksum, no_checksum)",
            ["kind"],
            registry=r,
        )
        # Start-up phases, for `istream demo` and dashboards: what a worker is busy with
        # before its first batch (loading the base, joining the group, encoding the catalog).
        self.model_loaded = Gauge(
            "istream_model_loaded", "1 once the base model and the interest model are loaded", registry=r
        )
        self.partitions_assigned = Gauge(
            "istream_partitions_assigned",
            "Partitions assigned to this worker (0: not in the group)",
            registry=r,
        )
        self.texts_encoded = Counter(
            "istream_base_texts_encoded",
            "Texts (catalog items, queries) encoded by the base model",
            registry=r,
        )
        self.dp_epsilon = Gauge(
            "istream_dp_epsilon",
            "User-level DP: epsilon spent so far by the shared parameters (docs/privacy.md)",
            registry=r,
        )
        self.dp_exhausted = Gauge(
            "istream_dp_budget_exhausted",
            "1 when the DP budget is spent and the shared parameters are frozen",
            registry=r,
        )
        self._version: str | None = None
        # Poison or systemic (stream/resilience.py): a systemic failure is no record's fault;
        # it leaves offsets uncommitted and, repeated ISTREAM_SYSTEMIC_MAX_ATTEMPTS times,
        # stops the worker. Alert on istream_systemic_failing == 1.
        self.systemic_failures = Counter(
            "istream_systemic_failures",
            "Batch attempts that failed systemically (model step, our code), offsets left uncommitted",
            ["where"],
            registry=r,
        )
        self.systemic_failing = Gauge(
            "istream_systemic_failing",
            "1 while the current batch fails systemically (the worker exits after the last attempt)",
            registry=r,
        )
        self.systemic_error = Gauge(
            "istream_systemic_error_info",
            "The last systemic error (in the label); 1 while it is failing",
            ["error"],
            registry=r,
        )
        self._systemic_error: str | None = None

    def set_systemic_error(self, error: str) -> None:
        if self._systemic_error is not None and self._systemic_error != error:
            self.systemic_error.remove(self._systemic_error)
        self._systemic_error = error[:300]
        self.systemic_error.labels(self._systemic_error).set(1)

    def systemic_recovered(self) -> None:
        self.systemic_failing.set(0)
        if self._systemic_error is not None:
            self.systemic_error.labels(self._systemic_error).set(0)

    def refused_weights(self, version: str, error: WeightsRejected) -> None:
        """BatchProcessor's on_weights_refused hook."""
        self.weights_refused.labels(error.kind).inc()

    def observe(self, outcome: BatchOutcome, n_records: int) -> None:
        self.applied.inc(outcome.applied)
        self.duplicates.inc(outcome.duplicates)
        self.invalid.inc(len(outcome.dead_letters))
        self.batch_seconds.observe(outcome.seconds)
        self.batch_size.observe(n_records)
        for ts in outcome.event_ts:
            self.freshness.observe(max(outcome.committed_at - ts, 0.0))
        for ts in outcome.record_ts:
            self.produce_to_commit.observe(max(outcome.committed_at - ts, 0.0))
        if outcome.loss is not None:
            self.loss.set(outcome.loss)
        if outcome.dp_epsilon is not None:
            self.dp_epsilon.set(outcome.dp_epsilon)
            self.dp_exhausted.set(float(outcome.dp_exhausted))
        if outcome.model_version and outcome.model_version != self._version:
            if self._version is not None:
                self.model_version.remove(self._version)
            self.model_version.labels(outcome.model_version).set(1)
            self._version = outcome.model_version


class MetricsPortError(OSError):
    """The metrics port cannot be bound (a configuration mistake, reported in one line)."""


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    """Expose /metrics over HTTP in a daemon thread (port 0: don't)."""
    if port:
        try:
            start_http_server(port, registry=registry)
        except OSError as exc:
            raise MetricsPortError(
                f"cannot serve metrics on port {port} ({exc.strerror or exc}); "
                "set ISTREAM_METRICS_PORT to a free port, or 0 to turn the endpoint off"
            ) from None
