"""`istream`: the command line. User mistakes end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from pydantic import ValidationError

from stream.settings import Settings, get_settings

if TYPE_CHECKING:
    from storage.repository import VectorStore
    from stream.backtest.data import BacktestData


class UserError(click.ClickException):
    """A mistake the user can fix; shown as one line, never as a stack trace."""


def settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "ISTREAM_" + str(first["loc"][0]).upper() if first.get("loc") else "ISTREAM_*"
        raise UserError(f"bad setting {name}: {first['msg']}") from None


@click.group()
def cli() -> None:
    """interest-stream: streaming user-interest vectors from Kafka events into Postgres."""


@cli.command()
def worker() -> None:
    """Run the Faust worker (embedded broker/Postgres when ISTREAM_KAFKA_BOOTSTRAP/DATABASE_URL are unset)."""
    s = settings()  # a bad setting is a one-line answer before seconds of imports (torch, Faust)
    from models.registry import available
    from stream.logs import configure
    from stream.metrics import MetricsPortError
    from stream.runtime import PluginError, load_plugins
    from stream.servers import Servers
    from stream.worker import ExitNow, VectorWidthMismatch, exit_now, run_worker

    try:
        load_plugins(s)
    except PluginError as exc:
        raise UserError(str(exc)) from None
    if s.model.partition(":")[0] not in available():
        raise UserError(f"unknown model {s.model!r} (ISTREAM_MODEL); choose one of: {', '.join(available())}")
    configure(s.log_level, s.log_format)
    stuck: ExitNow | None = None
    with Servers(s) as ep:
        if ep.embedded_broker or ep.embedded_postgres:
            click.echo(f"embedded servers: kafka={ep.bootstrap} postgres={ep.database_url}", err=True)
        try:
            run_worker(s, ep.bootstrap, ep.database_url)
        except (MetricsPortError, VectorWidthMismatch) as exc:
            raise UserError(str(exc)) from None
        except ExitNow as exc:
            stuck = exc  # leave the `with` first: embedded servers are stopped
    if stuck is not None:
        exit_now(int(stuck.code or 0))


@cli.group()
def db() -> None:
    """Database schema and maintenance."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Create or migrate the schema to the newest (or given) revision."""
    s = settings()
    if not s.database_url:
        raise UserError("ISTREAM_DATABASE_URL is not set: say which Postgres to migrate")
    from storage.db import current_revision, upgrade
    from stream.runtime import vector_width

    try:
        dim = vector_width(s)
    except (OSError, ValueError) as exc:  # a base model that cannot be found or read
        raise UserError(f"cannot tell the vector width of ISTREAM_MODEL={s.model}: {exc}") from None
    try:
        upgrade(s.database_url, revision, vector_dim=dim, vector_backend=s.vector_backend)
    except RuntimeError as exc:  # e.g. stored vectors of another width: the message says what to set
        raise UserError(str(exc)) from None
    at = current_revision(s.database_url)
    vectors = ""
    if at is not None and at >= "0002":
        from storage.db import make_engine
        from storage.repository import VectorStore

        store = VectorStore(make_engine(s.database_url))
        vectors = f" ({store.backend.value} vectors, {store.dim} dimensions)"
        store.engine.dispose()
    click.echo(f"schema at revision {at}{vectors}")


def _store_for_maintenance() -> tuple[Settings, VectorStore]:
    """Settings and a VectorStore on ISTREAM_DATABASE_URL, whose schema has the storage functions."""
    # Not stream.runtime: these commands need no model, so they skip importing torch.
    from storage.db import current_revision, make_engine
    from storage.repository import VectorStore

    s = settings()
    if not s.database_url:
        raise UserError("ISTREAM_DATABASE_URL is not set: say which Postgres to use")
    try:
        revision = current_revision(s.database_url)
    except Exception as exc:  # connection refused, bad credentials, ...: one line, not a trace
        raise UserError(f"cannot reach Postgres: {str(exc).splitlines()[0]}") from None
    if revision is None or revision < "0002":
        raise UserError(f"schema is at {revision or 'nothing'}: run `istream db upgrade` first")
    return s, VectorStore(make_engine(s.database_url), group_id=s.group_id)


@db.command("prune")
@click.option("--keep-versions", type=click.IntRange(min=1), help="newest versions kept per user")
@click.option("--keep-all", "keep_all_s", type=click.FloatRange(min=0), help="seconds: keep all younger")
@click.option("--hourly", "hourly_s", type=click.FloatRange(min=0), help="seconds: hourly up to this old")
def db_prune(keep_versions: int | None, keep_all_s: float | None, hourly_s: float | None) -> None:
    """Thin the vector history by the retention policy (defaults: ISTREAM_RETENTION_*)."""
    from storage.repository import RetentionPolicy

    s, store = _store_for_maintenance()
    policy = RetentionPolicy.from_seconds(
        s.retention_keep_versions if keep_versions is None else keep_versions,
        s.retention_keep_all_s if keep_all_s is None else keep_all_s,
        s.retention_hourly_s if hourly_s is None else hourly_s,
    )
    report = store.prune(policy, progress=True)
    click.echo(
        f"pruned {report.user_versions_deleted} old versions of {report.users_scanned} users"
        f", {report.item_vectors_deleted} item vectors of unused model versions "
        f"and the weights of {report.weights_dropped} superseded model versions"
    )


@db.command("grant-reader")
@click.argument("role")
@click.option("--login/--no-login", default=True, show_default=True, help="may the role log in")
@click.option("--password-prompt", is_flag=True, help="set a password (asked for, never on the command line)")
def db_grant_reader(role: str, login: bool, password_prompt: bool) -> None:
    """Create ROLE if needed and let it read vectors and call the SQL functions, not write."""
    from sqlalchemy.engine import make_url

    from storage.access import AccessError, grant_reader

    s, store = _store_for_maintenance()
    password = None
    if password_prompt:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        grant = grant_reader(store.engine, role, login=login, password=password)
    except AccessError as exc:
        raise UserError(str(exc)) from None
    # URL.set() keeps the old password when given None; _replace really drops it.
    url = make_url(s.database_url or "")._replace(username=role, password="PASSWORD" if password else None)
    click.echo(f"{'created' if grant.created else 'updated'} read-only role {role} on {grant.database}")
    click.echo(f"connect with: {url.render_as_string(hide_password=False)}")


@cli.command()
@click.argument("user_id")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option(
    "--grace",
    "grace_s",
    type=click.FloatRange(min=0),
    help="seconds after now whose events are dropped too (default ISTREAM_ERASURE_GRACE_S)",
)
def erase(user_id: str, yes: bool, grace_s: float | None) -> None:
    """Erase USER_ID: every row in one transaction, a tombstone so the worker drops their events."""
    from datetime import timedelta

    s, store = _store_for_maintenance()
    if not yes:
        click.confirm(f"erase every stored row of user {user_id!r}? This cannot be undone", abort=True)
    grace = timedelta(seconds=s.erasure_grace_s if grace_s is None else grace_s)
    counts = store.erase_user(user_id, grace)
    click.echo("erased: " + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())))


@cli.command()
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--movielens", type=click.Path(path_type=Path), help="a MovieLens 100K folder")
@click.option("--lastfm", type=click.Path(path_type=Path), help="a Last.fm-2k folder (see docs/backtest.md)")
@click.option("--limit", type=click.IntRange(min=1), help="at most this many events")
def produce(file: Path | None, movielens: Path | None, lastfm: Path | None, limit: int | None) -> None:
    """Send a JSONL event log (or MovieLens 100K, or Last.fm-2k) to the topics, key = user_id."""
    from stream.broker import make_producer
    from stream.producer import EventProducer
    from stream.sources import lastfm_source, movielens_items, movielens_ratings, read_jsonl

    if sum(x is not None for x in (file, movielens, lastfm)) != 1:
        raise UserError("give one of FILE, --movielens DIR or --lastfm DIR")
    s = settings()
    if not s.kafka_bootstrap:
        raise UserError("ISTREAM_KAFKA_BOOTSTRAP is not set: say which broker to produce to")
    if movielens is not None:
        records: list = [*movielens_items(movielens), *movielens_ratings(movielens, limit)]
    elif lastfm is not None:
        records = lastfm_source(lastfm, limit).records
    else:
        assert file is not None
        records = list(read_jsonl(file))[:limit]
    prod = EventProducer(make_producer(s.kafka_bootstrap), s)
    report = prod.send_all(records, progress=True, total=len(records))
    for topic, n in sorted(report.sent.items()):
        click.echo(f"{topic}: {n}")
    if report.dead_lettered:
        click.echo(f"{s.topic_dead_letter}: {report.dead_lettered} (unroutable lines)")


@cli.command()
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="MovieLens 100K folder (default ../shared/data/ml-100k when present)",
)
@click.option("--events", "n_events", type=click.IntRange(min=10), default=20000, show_default=True)
@click.option("--users", "n_show", type=click.IntRange(min=1), default=3, show_default=True)
def demo(data: Path | None, n_events: int, n_show: int) -> None:
    """Start embedded servers, produce a sample, run the worker until done, show vectors."""
    from stream.demo import run_demo

    run_demo(settings(), data, n_events, n_show)


@cli.command()
def status() -> None:
    """Lag and freshness per partition (broker end offsets vs the offsets committed in Postgres)."""
    from kafka.errors import KafkaError
    from sqlalchemy.exc import SQLAlchemyError

    from stream.runtime import build_store
    from stream.status import format_health, format_status, partition_status, privacy_line, worker_health

    s = settings()
    if not s.kafka_bootstrap or not s.database_url:
        raise UserError("set ISTREAM_KAFKA_BOOTSTRAP and ISTREAM_DATABASE_URL to the worker's servers")
    store = build_store(s, s.database_url)
    try:
        rows = partition_status(s.kafka_bootstrap, store, [*s.event_topics, s.topic_items])
        dp = privacy_line(store)
    except KafkaError as exc:
        raise UserError(f"cannot read the broker at {s.kafka_bootstrap}: {exc}") from None
    except SQLAlchemyError as exc:
        raise UserError(f"cannot read Postgres: {str(exc).splitlines()[0]}") from None
    finally:
        store.engine.dispose()
    click.echo(format_status(rows))
    if dp is not None:
        click.echo(dp)
    urls = [u.strip() for u in s.status_workers.split(",") if u.strip()]
    if not urls and s.metrics_port:
        urls = [f"http://127.0.0.1:{s.metrics_port}/metrics"]
    if urls:
        click.echo(format_health([worker_health(u) for u in urls]))


@cli.command()
@click.argument("log", required=False, type=click.Path(path_type=Path))
@click.option("--movielens", type=click.Path(path_type=Path), help="a MovieLens 100K folder instead of LOG")
@click.option("--lastfm", type=click.Path(path_type=Path), help="a Last.fm-2k folder instead of LOG")
@click.option(
    "--speed",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="event-time seconds per wall second (3600: an hour a second); 0: as fast as possible",
)
@click.option("--limit", type=click.IntRange(min=1), help="at most this many events")
def replay(
    log: Path | None, movielens: Path | None, lastfm: Path | None, speed: float, limit: int | None
) -> None:
    """Push a recorded log into the topics in event time, each user's order kept, timing scaled by --speed."""
    from stream.broker import make_producer
    from stream.producer import EventProducer
    from stream.replay import paced, schedule
    from stream.sources import lastfm_source, movielens_items, movielens_ratings, read_jsonl

    if sum(x is not None for x in (log, movielens, lastfm)) != 1:
        raise UserError("give one of LOG, --movielens DIR or --lastfm DIR")
    s = settings()
    if not s.kafka_bootstrap:
        raise UserError("ISTREAM_KAFKA_BOOTSTRAP is not set: say which broker to replay into")
    if movielens is not None:
        items: list = [*movielens_items(movielens), *movielens_ratings(movielens, limit)]
    elif lastfm is not None:
        items = lastfm_source(lastfm, limit).records
    else:
        assert log is not None
        items = list(read_jsonl(log))
    catalog, timed = schedule(items)
    if limit is not None:
        timed = timed[:limit]
    # One request in flight per connection: a retry cannot reorder a user's records.
    prod = EventProducer(
        make_producer(s.kafka_bootstrap, max_in_flight_requests_per_connection=1), s, source="replay"
    )
    if catalog:
        prod.send_all(catalog)
    span = (timed[-1].at - timed[0].at) if timed else 0.0
    pace = f"at {speed:g}x (about {span / speed:.0f}s)" if speed > 0 else "as fast as possible"
    click.echo(f"replaying {len(timed)} events {pace}", err=True)
    report = prod.send_all(paced(timed, speed), progress=True, total=len(timed))
    for topic, n in sorted(report.sent.items()):
        click.echo(f"{topic}: {n}")
    if report.dead_lettered:
        click.echo(f"{s.topic_dead_letter}: {report.dead_lettered} (unroutable lines)")


@cli.command()
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--movielens", type=click.Path(path_type=Path), help="a MovieLens 100K folder")
@click.option("--lastfm", type=click.Path(path_type=Path), help="a Last.fm-2k folder (tags as searches)")
@click.option("--topics", is_flag=True, help="read the event topics of ISTREAM_KAFKA_BOOTSTRAP")
@click.option("--from-offset", type=click.IntRange(min=0), help="topic range start, per partition")
@click.option("--to-offset", type=click.IntRange(min=0), help="topic range end (exclusive), per partition")
@click.option("--from-ts", help="topic range start: record time, RFC 3339 or epoch ms")
@click.option("--to-ts", help="topic range end (exclusive): record time, RFC 3339 or epoch ms")
@click.option("--models", "model_list", help="comma-separated models [ISTREAM_BACKTEST_MODELS]")
@click.option("--batch-size", type=click.IntRange(min=1), help="events per micro-batch")
@click.option("--threshold", type=float, help="ratings at or above this are positives (default 4)")
@click.option("--window-hours", type=click.FloatRange(min=0, min_open=True), help="rolling-curve window")
@click.option(
    "--limit", type=click.IntRange(min=1), help="at most this many events (the first of the source)"
)
@click.option("--seed", type=int, help="random seed for every model [ISTREAM_SEED]")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="report folder")
@click.option("--no-report", is_flag=True, help="print the table only, write no report folder")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--pit", "pit_prefix", help="also write vectors to Postgres schemas <PIT>_<model>")
@click.option("--pit-replace", is_flag=True, help="drop and recreate those schemas if they exist")
@click.option(
    "--profiles",
    is_flag=True,
    help="with --movielens: give the models the users' demographics for cold start "
    "(the live worker never receives them)",
)
def backtest(
    file: Path | None,
    movielens: Path | None,
    lastfm: Path | None,
    topics: bool,
    from_offset: int | None,
    to_offset: int | None,
    from_ts: str | None,
    to_ts: str | None,
    model_list: str | None,
    batch_size: int | None,
    threshold: float | None,
    window_hours: float | None,
    limit: int | None,
    seed: int | None,
    out_dir: Path | None,
    no_report: bool,
    quiet: bool,
    pit_prefix: str | None,
    pit_replace: bool,
    profiles: bool,
) -> None:
    """Replay an event log through the models (predict, then learn) and report how well they did."""
    from sqlalchemy.exc import SQLAlchemyError

    from stream.backtest.data import load_jsonl, load_lastfm, load_movielens
    from stream.backtest.models import check_models, parse_model_list
    from stream.backtest.report import side_by_side, table
    from stream.backtest.run import PointInTime, config_from, default_out_dir, run
    from stream.runtime import limits

    if sum((file is not None, movielens is not None, lastfm is not None, topics)) != 1:
        raise UserError(
            "give one source: FILE (a JSONL event log), --movielens DIR, --lastfm DIR or --topics"
        )
    if not topics and any(v is not None for v in (from_offset, to_offset, from_ts, to_ts)):
        raise UserError("--from-offset/--to-offset/--from-ts/--to-ts only apply with --topics")
    if profiles and movielens is None:
        raise UserError("--profiles only applies with --movielens (the only source with user profiles)")
    s = settings()
    pit = None
    if pit_prefix is not None:
        if not s.database_url:
            raise UserError(
                "--pit needs ISTREAM_DATABASE_URL: say which Postgres gets the backtest's schemas"
            )
        pit = PointInTime(s.database_url, pit_prefix, pit_replace)
    try:
        names = check_models(parse_model_list(model_list or s.backtest_models))
        config = config_from(
            s,
            batch_size=batch_size,
            positive_threshold=threshold,
            window_s=window_hours * 3600 if window_hours else None,
            seed=seed,
            progress=not quiet,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if topics:
        data = _topic_source(s, from_offset, to_offset, from_ts, to_ts)
        if limit is not None:
            data.events = data.events[:limit]  # the earliest by event time
    elif movielens is not None:
        data = load_movielens(movielens, limits(s), limit, profiles=profiles)
    elif lastfm is not None:
        data = load_lastfm(lastfm, limits(s), limit)
    else:
        assert file is not None
        data = load_jsonl(file, limits(s), limit)
    if not data.events:
        raise UserError("the event log holds no valid events")
    if data.rejected:
        click.echo(
            f"{len(data.rejected)} invalid records skipped, e.g. {data.rejected[0].where}: "
            f"{data.rejected[0].reason}",
            err=True,
        )
    target = None if no_report else (out_dir or default_out_dir(s))
    try:
        outcome = run(data, names, s, config, target, pit=pit)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    except SQLAlchemyError as exc:
        raise UserError(f"point-in-time database: {str(exc).splitlines()[0]}") from None
    res = outcome.result
    pct = round(res.config.tail_fraction * 100)
    click.echo(f"full stream ({res.totals()[names[0]]['n']} warm positives):")
    click.echo(table(res, "warm"))
    click.echo(f"\nlast {pct}% of events:")
    click.echo(table(res, "tail"))
    click.echo(f"\nnew items (fewer than {res.config.new_item_events} earlier events of the item):")
    click.echo(table(res, "new_item"))
    click.echo("\nside by side (ratio to the best baseline of the slice; † trained offline on these events):")
    click.echo(side_by_side(res))
    click.echo(f"\ncold start ({res.counts['cold']} positives):")
    click.echo(table(res, "cold"))
    for model, dp in outcome.privacy.items():
        click.echo(
            f"\n{model}: DP epsilon spent {dp['dp_epsilon']:.3f} at delta {dp['dp_delta']:.2e} "
            f"(noise multiplier {dp['dp_noise_multiplier']:.3f}, busiest user in "
            f"{dp['dp_max_participations']:.0f} of {dp['dp_releases']:.0f} steps)"
        )
    click.echo(f"\n{res.n_events} events in {outcome.seconds:.1f} s")
    if outcome.out_dir is not None:
        click.echo(f"report: {outcome.out_dir}")
    for model, schema in outcome.pit_schemas.items():
        click.echo(f"point-in-time vectors of {model}: schema {schema}")


def _topic_source(
    s: Settings, from_offset: int | None, to_offset: int | None, from_ts: str | None, to_ts: str | None
) -> BacktestData:
    from kafka.errors import KafkaError

    from stream.backtest.topics import TopicRange, load_topic_range
    from stream.runtime import limits

    if not s.kafka_bootstrap:
        raise UserError("ISTREAM_KAFKA_BOOTSTRAP is not set: say which broker holds the topics")

    try:
        rng = TopicRange(from_offset, to_offset, _when(from_ts, "--from-ts"), _when(to_ts, "--to-ts"))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        return load_topic_range(s.kafka_bootstrap, s, rng, limits(s))
    except KafkaError as exc:
        raise UserError(f"cannot read the topics at {s.kafka_bootstrap}: {exc}") from None


def _when(value: str | None, flag: str) -> float | None:
    """An RFC 3339 time or epoch milliseconds from the command line, as epoch seconds."""
    from stream.schema import InvalidRecord, parse_ts

    if value is None:
        return None
    try:
        return parse_ts(int(value) if value.strip().isdigit() else value)
    except InvalidRecord as exc:
        raise UserError(f"{flag}: {exc.reason}") from None


@cli.command()
@click.option("--since", help="rank positives at or after this event time: RFC 3339 or epoch ms")
@click.option("--until", help="rank positives before this event time: RFC 3339 or epoch ms")
@click.option("--threshold", type=float, help="ratings at or above this are positives (default 4)")
@click.option("--window-hours", type=click.FloatRange(min=0, min_open=True), help="rolling-curve window")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="report folder")
@click.option("--no-report", is_flag=True, help="print the table only, write no report folder")
@click.option(
    "--against",
    type=click.Path(path_type=Path),
    help="a backtest report folder (or its result.json): print its figures beside the live ones",
)
@click.option("--against-model", help="which model of that report [the live model's]")
@click.option("--quiet", is_flag=True, help="no progress")
def evaluate(
    since: str | None,
    until: str | None,
    threshold: float | None,
    window_hours: float | None,
    out_dir: Path | None,
    no_report: bool,
    against: Path | None,
    against_model: str | None,
    quiet: bool,
) -> None:
    """The live system's report card: rank each applied positive against the vector stored just before it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from stream.backtest.report import table, write_report
    from stream.backtest.run import config_from, default_out_dir
    from stream.evaluate import EvaluateError, Window, compare, evaluate_live, load_against, meta

    s, store = _store_for_maintenance()
    try:
        window = Window(_when(since, "--since"), _when(until, "--until"))
        config = config_from(
            s,
            positive_threshold=threshold,
            window_s=window_hours * 3600 if window_hours else None,
            progress=not quiet,
        )
        reference = load_against(against) if against is not None else None
    except (EvaluateError, ValueError) as exc:
        raise UserError(str(exc)) from None
    try:
        outcome = evaluate_live(store.engine, config, window, show_progress=not quiet)
    except EvaluateError as exc:
        raise UserError(str(exc)) from None
    except SQLAlchemyError as exc:
        raise UserError(f"cannot read Postgres: {str(exc).splitlines()[0]}") from None
    finally:
        store.engine.dispose()
    res = outcome.result
    pct = round(res.config.tail_fraction * 100)
    click.echo(f"live, full range ({res.totals()[outcome.model]['n']} warm positives):")
    click.echo(table(res, "warm"))
    click.echo(f"\nlast {pct}% of events:")
    click.echo(table(res, "tail"))
    click.echo(f"\ncold start ({res.counts['cold']} positives):")
    click.echo(table(res, "cold"))
    c = res.counts
    click.echo(
        f"\n{res.n_events} events; {c['no_vector']} warm positives had no stored vector yet "
        f"({c['served_prior']} positives ranked by their version's prior); "
        f"{c['pruned_versions']} versions pruned by retention; {len(outcome.model_versions)} model versions"
    )
    if reference is not None:
        try:
            click.echo("\n" + compare(res, outcome.model, reference, against_model))
        except EvaluateError as exc:
            raise UserError(str(exc)) from None
    if not no_report:
        target = out_dir or default_out_dir(s).with_name("live-" + default_out_dir(s).name)
        database = make_url(s.database_url or "").render_as_string(hide_password=True)
        write_report(res, target, meta(outcome, window, database), live=True)
        click.echo(f"report: {target}")


@cli.command()
@click.argument("user_id")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="events to show")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def explain(user_id: str, top: int, as_json: bool) -> None:
    """Which of USER_ID's events shaped their current interest vector, with weights (ISTREAM_MODEL)."""
    import json
    from datetime import UTC, datetime

    from storage.db import make_engine
    from stream.explain import ExplainError, explain_user

    s = settings()
    if not s.database_url:
        raise UserError("ISTREAM_DATABASE_URL is not set: say which Postgres holds the user's events")
    engine = make_engine(s.database_url)
    try:
        result = explain_user(s, engine, user_id, top=top)
    except ExplainError as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:  # e.g. an unknown ISTREAM_MODEL
        raise UserError(str(exc)) from None
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps({**result.__dict__}, default=str, indent=2))
        return
    version = result.model_version or "untrained weights (no published version found)"
    click.echo(f"user {result.user_id}: {result.n_events} events, model {result.model} ({version})")
    click.echo(f"{'weight':>8} {'attn':>6}  {'kind':<9} {'when (UTC)':<19}  what")
    for r in result.rows:
        when = datetime.fromtimestamp(r["ts"], UTC).strftime("%Y-%m-%d %H:%M:%S") if r.get("ts") else ""
        what = r.get("title") or r.get("item_id") or r.get("query") or ""
        attn = f"{r['attention']:.3f}" if "attention" in r else ""
        click.echo(f"{r['weight']:>8.3f} {attn:>6}  {r['kind']:<9} {when:<19}  {what}")


def main() -> None:
    from stream.sources import SourceError

    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("istream: aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        click.echo(f"istream: {exc.format_message()} (see --help)", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"istream: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except SourceError as exc:
        click.echo(f"istream: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
