"""Getting a batch through outages and poison: retry what is transient, isolate bad values,
stop on what no record explains.

Transient (a server is down or unreachable): wait with exponential backoff and
retry the whole batch until it commits — each attempt is atomic and idempotent
(see stream/processor.py), so retrying can neither lose nor double anything.
While a batch waits, the worker's intake is full and consumption pauses.

Record-level (Postgres rejected a value: SQLSTATE class 22, "data exception"):
split the batch in halves and retry each, down to the single record that cannot
be stored, which goes to the dead-letter topic with the error as its reason (a
poison record never stops a partition).

Systemic (anything else: an error of the model step, of our own code, or a
database error no value explains): `SystemicFailure`, the batch stays
uncommitted and the worker decides how often to try again before it exits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from kafka.errors import KafkaError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_any,
    stop_never,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from stream.processor import BatchProcessor, ShuttingDown, StagedBatch, SystemicFailure
from stream.records import BatchOutcome, RawRecord

log = logging.getLogger("istream.resilience")

__all__ = ["ResilientRunner", "ShuttingDown", "SystemicFailure", "is_record_level", "is_transient"]


def is_transient(exc: BaseException) -> bool:
    """Errors that say a server is away, not that the records are bad."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False)) or "Timeout" in type(exc).__name__
    return isinstance(exc, ConnectionError | TimeoutError)


def is_record_level(exc: BaseException) -> bool:
    """Postgres refused a value of the batch (SQLSTATE class 22: too long, out of range,
    invalid text or bytes...): a property of one record, which bisection can pin down.

    Class 23 (integrity) is not: our writes deduplicate and lock, so a violated
    constraint says our code or schema is wrong, not a record.
    """
    if isinstance(exc, SystemicFailure):
        return False
    orig = exc.orig if isinstance(exc, DBAPIError) else exc  # psycopg's own, e.g. from COPY
    state = getattr(orig, "sqlstate", None)
    return isinstance(state, str) and state.startswith("22")


class _stop_when(stop_base):
    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.should_stop()


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning(
        "batch attempt %d failed (%s: %s); retrying in %.1fs",
        state.attempt_number,
        type(exc).__name__,
        str(exc).splitlines()[0][:200] if exc else "",
        wait,
    )


class ResilientRunner:
    """Runs batches through a `BatchProcessor` with retries and poison isolation."""

    def __init__(
        self,
        processor: BatchProcessor,
        max_wait_s: float = 5.0,
        should_stop: Callable[[], bool] = lambda: False,
        on_retry: Callable[[], None] = lambda: None,
    ) -> None:
        self.processor = processor
        self.max_wait_s = max_wait_s
        self.should_stop = should_stop
        self.on_retry = on_retry

    def _retrying(self) -> Retrying:
        def before_sleep(state: RetryCallState) -> None:
            self.on_retry()
            _log_retry(state)

        return Retrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(initial=0.2, max=self.max_wait_s),
            stop=stop_any(stop_never, _stop_when(self.should_stop)),
            before_sleep=before_sleep,
            reraise=True,
        )

    def _attempt(self, fn: Callable[[], BatchOutcome]) -> BatchOutcome:
        try:
            return self._retrying()(fn)
        except Exception as exc:
            if is_transient(exc) and self.should_stop():
                raise ShuttingDown(str(exc)) from exc
            raise

    def stage(self, records: Sequence[RawRecord]) -> StagedBatch | BatchOutcome:
        """Learn a batch for a later `BatchProcessor.commit` (the worker's pipeline).

        Only the first attempt is staged: on any failure the batch goes the synchronous
        way (`run`: retries, poison isolation) and comes back committed.
        """
        try:
            return self.processor.stage(records)
        except (ShuttingDown, SystemicFailure):
            raise
        except Exception as exc:
            log.info("staging %d records failed (%s); processing them synchronously", len(records), exc)
            return self.run(records)

    def run(self, records: Sequence[RawRecord]) -> BatchOutcome:
        try:
            return self._attempt(lambda: self.processor.process(records))
        except (ShuttingDown, SystemicFailure):
            raise
        except Exception as exc:
            if is_transient(exc):
                raise
            if not is_record_level(exc):
                raise SystemicFailure("batch", exc) from exc
            reason = f"processing failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            if len(records) == 1:
                log.error(
                    "poison record %s/%d@%d: %s",
                    records[0].topic,
                    records[0].partition,
                    records[0].offset,
                    reason,
                )
                return self._attempt(lambda: self.processor.skip(records, reason))
            log.warning("batch of %d failed (%s); isolating the bad record", len(records), reason)
            half = len(records) // 2
            outcome = self.run(records[:half])
            return outcome.merge(self.run(records[half:]))
