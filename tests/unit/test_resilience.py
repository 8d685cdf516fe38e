"""Poison or systemic: which failures dead-letter a record and which stop the worker (fakes only)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError

from stream.processor import SystemicFailure
from stream.records import BatchOutcome, RawRecord
from stream.resilience import ResilientRunner, is_record_level, is_transient


class PgError(Exception):
    """Stands in for a psycopg error: what matters is its SQLSTATE."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def wrapped(cls: type[Exception], sqlstate: str, message: str = "boom") -> Exception:
    return cls("INSERT ...", {}, PgError(sqlstate, message))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("exc", "record_level"),
    [
        (wrapped(DataError, "22001", "value too long for type character varying(128)"), True),
        (wrapped(DataError, "22003", "numeric field overflow"), True),
        (PgError("22P02", "invalid input syntax"), True),  # raised by psycopg itself (COPY)
        (wrapped(IntegrityError, "23505", "duplicate key"), False),  # our dedup or schema is wrong
        (wrapped(ProgrammingError, "42703", 'column "x" does not exist'), False),  # schema mismatch
        (ValueError("operands could not be broadcast together"), False),  # our own code
        (SystemicFailure("model step (learn)", RuntimeError("shape")), False),
    ],
)
def test_only_a_value_postgres_rejects_is_record_level(exc: Exception, record_level: bool) -> None:
    assert is_record_level(exc) is record_level
    assert not is_transient(exc)


def rec(offset: int, value: bytes = b"{}") -> RawRecord:
    return RawRecord("interest.clicks", 0, offset, b"u", value)


class FakeProcessor:
    """Fails a batch as the real one would when `fail(records)` names an error."""

    def __init__(self, fail: object) -> None:
        self.fail = fail
        self.committed: list[int] = []
        self.skipped: list[tuple[int, str]] = []

    def process(self, records: Sequence[RawRecord]) -> BatchOutcome:
        exc = self.fail(records)  # type: ignore[operator]
        if exc is not None:
            raise exc
        self.committed.extend(r.offset for r in records)
        return BatchOutcome(applied=len(records))

    def skip(self, records: Sequence[RawRecord], reason: str) -> BatchOutcome:
        self.skipped.extend((r.offset, reason) for r in records)
        return BatchOutcome()


def test_a_rejected_value_is_bisected_to_its_record_and_dead_lettered() -> None:
    def fail(records: Sequence[RawRecord]) -> Exception | None:
        if any(r.value == b"long" for r in records):
            return wrapped(DataError, "22001", "value too long for type character varying(128)")
        return None

    proc = FakeProcessor(fail)
    batch = [rec(i, b"long" if i == 5 else b"{}") for i in range(8)]
    out = ResilientRunner(proc).run(batch)  # type: ignore[arg-type]
    assert out.applied == 7
    assert sorted(proc.committed) == [0, 1, 2, 3, 4, 6, 7]
    assert [o for o, _ in proc.skipped] == [5]
    assert "value too long" in proc.skipped[0][1]


@pytest.mark.parametrize(
    "error",
    [
        SystemicFailure("model step (learn)", RuntimeError("mat1 and mat2 shapes cannot be multiplied")),
        TypeError("unsupported operand type(s) for +: 'NoneType' and 'float'"),
        wrapped(ProgrammingError, "42703", 'column "weights_sha256" does not exist'),
    ],
)
def test_a_systemic_error_stops_the_batch_without_dead_lettering_or_committing(error: Exception) -> None:
    proc = FakeProcessor(lambda records: error)
    with pytest.raises(SystemicFailure) as exc:
        ResilientRunner(proc).run([rec(i) for i in range(8)])  # type: ignore[arg-type]
    assert proc.skipped == [] and proc.committed == []
    assert exc.value.cause is error or exc.value is error


def test_a_systemic_error_met_while_isolating_a_poison_record_still_stops() -> None:
    """Half of the batch commits, the other half meets a model error: no dead letter for it."""

    def fail(records: Sequence[RawRecord]) -> Exception | None:
        if any(r.value == b"long" for r in records):
            return wrapped(DataError, "22001", "value too long")
        if any(r.offset >= 4 for r in records):
            return SystemicFailure("model step (learn)", RuntimeError("shape"))
        return None

    proc = FakeProcessor(fail)
    with pytest.raises(SystemicFailure):
        ResilientRunner(proc).run([rec(i, b"long" if i == 6 else b"{}") for i in range(8)])  # type: ignore[arg-type]
    assert proc.committed == [0, 1, 2, 3]
    assert proc.skipped == []


def test_systemic_state_in_metrics_reads_back_in_status() -> None:
    """What `istream status` prints for a worker comes from its Prometheus endpoint."""
    from prometheus_client import CollectorRegistry, start_http_server

    from stream.broker import free_port
    from stream.metrics import WorkerMetrics
    from stream.status import format_health, worker_health

    registry = CollectorRegistry()
    m = WorkerMetrics(registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        assert format_health([worker_health(url)]) == f"worker {url}: ok"
        m.systemic_failures.labels("model step").inc()
        m.systemic_failing.set(1)
        m.set_systemic_error("model step (learn): RuntimeError: shapes")
        h = worker_health(url)
        assert (h.failing, h.failures, h.error) == (True, 1, "model step (learn): RuntimeError: shapes")
        assert "SYSTEMIC FAILURE, 1 failed attempts" in format_health([h])
        m.systemic_recovered()
        assert "ok (recovered from 1 systemic failures" in format_health([worker_health(url)])
    finally:
        server.shutdown()
        thread.join(5)
    gone = worker_health(url, timeout_s=0.5)
    assert not gone.reachable and "unreachable" in format_health([gone])
