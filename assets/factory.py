"""One factory turns a FlowSpec into its Dagster asset, with the contract as an asset check.

The asset's resources are keyed by system: the source's system (`erp`, `chinook`: offers
`source(table)`), `state`, and the target's system (`crm`, `finance`), which must offer
`destination(target)` as a context manager.
"""

import functools
import warnings
from contextlib import contextmanager
from datetime import timedelta

import dagster as dg
from pydantic import Field

from assets.checks import (
    AUDIT_HEAD,
    EXTRA_LEFT,
    SYNC_CHECKS,
    audit_anchor_check_result,
    audit_anchor_check_spec,
    contract_check_result,
    contract_check_spec,
    drift_metadata,
)
from assets.connections import flow_connections, required_resources
from integrations.contracts import Contract
from integrations.engine.destination import DestinationMismatch
from integrations.engine.errors import (
    ArchiveGuardTripped,
    DestinationRefusedWrite,
    ErrorBudgetExceeded,
    ErrorBudgetTripStands,
    FlowHeld,
    SourceRefusedRead,
    SyncError,
)
from integrations.engine.reconcile import Drift, reconcile
from integrations.engine.source import SourceReadFailed, SourceUnavailable
from integrations.engine.spec import FlowSpec
from integrations.engine.state import AuditHead, BudgetTrip, StateStoreUnavailable
from integrations.engine.sync import Sync, SyncResult
from integrations.settings import database_url_variable
from integrations.sql.source import SourceSchemaError

API_SYSTEMS = {"crm", "helpdesk"}


class SyncConfig(dg.Config):
    # Field descriptions, not attribute docstrings: the Launchpad shows only the former.
    full_refresh: bool = Field(
        default=False,
        description="Read every source row (reconciliation) instead of only what changed since "
        "the watermark.",
    )
    allow_mass_archive: bool = Field(
        default=False,
        description="Let this run archive more than the flow's archive guard allows (after "
        "checking the source).",
    )
    repair: bool = Field(
        default=False,
        description="Reconcile, then send again exactly the records missing or differing in the "
        "destination, and archive the extra ones this flow wrote whose source rows are gone "
        "(any other extra record is left, with a warning).",
    )
    replay: bool = Field(
        default=False,
        description="Sync the flow's open dead letters again (from the source, or their payload), "
        "nothing else; it goes on while the flow's error budget is tripped.",
    )
    acknowledge_budget_trip: bool = Field(
        default=False,
        description="Run although an earlier run tripped the flow's error budget and some of its "
        "dead letters are still open (after checking them): clears the trip, audited; they stay "
        "in the DLQ.",
    )


def asset_key(spec: FlowSpec) -> dg.AssetKey:
    return dg.AssetKey([spec.target.system, spec.target.dataset])


def sync_checks(specs: list[FlowSpec]) -> list[dg.AssetCheckKey]:
    """The checks a sync of these flows evaluates (contract, audit anchor). A run request that
    names its assets names these too: left unnamed, Dagster adds every check of those assets,
    the reconciliation with it."""
    return [dg.AssetCheckKey(asset_key(spec), name) for spec in specs for name in SYNC_CHECKS]


def sync_selection(specs: list[FlowSpec]) -> dg.AssetSelection:
    """What a sync runs: the flows' assets and their sync checks, not the reconciliation, which
    reads the whole destination, on its own schedule."""
    keys = [asset_key(spec) for spec in specs]
    return dg.AssetSelection.assets(*keys).without_checks() | dg.AssetSelection.checks(
        *sync_checks(specs)
    )


def source_key(spec: FlowSpec) -> dg.AssetKey:
    return dg.AssetKey([spec.source.system, spec.source.table])


def source_asset_specs(specs: list[FlowSpec]) -> list[dg.AssetSpec]:
    """The source tables the flows read, as external assets: lineage from source to destination."""
    produced = {(spec.target.system, spec.target.dataset) for spec in specs}
    sources = {
        (spec.source.system, spec.source.table): spec.source
        for spec in specs
        if (spec.source.system, spec.source.table) not in produced  # a flow's asset already
    }
    return [
        dg.AssetSpec(
            key=[system, table],
            group_name=system,
            kinds={system} if system in API_SYSTEMS else {"sql"},
            description=f"Table `{table}` of {system}, a system of record, read "
            + (f"incrementally by `{source.cursor}`." if source.cursor else "whole (no cursor)."),
        )
        for (system, table), source in sorted(sources.items())
    ]


def table_schema(contract: Contract) -> dg.TableSchema:
    columns = []
    for name, column in contract.schema.columns.items():
        constraints = dg.TableColumnConstraints(
            nullable=bool(column.nullable),
            unique=bool(column.unique),
            other=[str(check) for check in column.checks]
            + (["pii"] if name in contract.pii_fields else []),
        )
        columns.append(dg.TableColumn(name=name, type=str(column.dtype), constraints=constraints))
    return dg.TableSchema(columns=columns)


def trigger_of(context: dg.AssetExecutionContext, config: SyncConfig) -> str:
    tags = context.run.tags
    if config.replay:
        return "replay"
    if config.repair:
        return "repair"
    if "dagster/backfill" in tags:
        return f"backfill {tags['dagster/backfill']}"
    if "dagster/schedule_name" in tags:
        return f"schedule {tags['dagster/schedule_name']}"
    if "dagster/sensor_name" in tags:
        return f"sensor {tags['dagster/sensor_name']}"
    return "manual"


def _metadata(spec: FlowSpec, result: SyncResult) -> dict[str, object]:
    counts = {
        name: int(result.counts[name])
        for name in (
            "read",
            "valid",
            "rejected",
            "unchanged",
            "skipped",
            "held",
            "inserted",
            "updated",
            "archived",
            *(["echoes"] if spec.echo_of else []),
        )
    }
    return {
        **counts,
        "written": result.written,
        "all_unchanged": result.written == 0 and result.counts["rejected"] == 0,
        "batches": result.batches,
        "seconds": round(result.seconds, 3),
        "rows_per_second": round(result.rows_per_second, 1),
        "stage_seconds": dg.MetadataValue.json(result.stage_timings(digits=4)),
        "cursor_before": dg.MetadataValue.json(
            result.watermark_before.as_dict() if result.watermark_before else None
        ),
        "cursor": dg.MetadataValue.json(
            result.watermark_after.as_dict() if result.watermark_after else None
        ),
        "full_refresh": result.full,
        "top_failure_reasons": dg.MetadataValue.json(dict(result.reasons.most_common(5))),
        "failures_by_kind": dg.MetadataValue.json(dict(result.kinds.most_common())),
        "dead_letters_open": sum(result.open_dead_letters.values()),
        "dead_letters_open_by_kind": dg.MetadataValue.json(result.open_dead_letters),
        "contract": f"{spec.source_contract.label} → {spec.target_contract.label}",
        "dagster/column_schema": table_schema(spec.target_contract),
    }


def _days_counted(context: dg.AssetExecutionContext) -> dict[str, object]:
    """Which days the counts cover: a single-run backfill records a materialization for each
    day of its range, and each carries the whole run's counts (the run reads the range as one
    window, so its archive guard weighs the range's deletes together)."""
    days = context.partition_keys
    cover = days[0] if len(days) == 1 else f"{days[0]} … {days[-1]} ({len(days)} days, one run)"
    return {"counts_cover": cover, "days_in_run": len(days)}


def _failure(
    spec: FlowSpec, error: SyncError, api_facing: bool, transport: dict[str, object]
) -> dg.Failure:
    metadata: dict[str, object] = {
        "flow": spec.name,
        "what_to_do": error.todo,
        **_transport_metadata(spec, transport),
    }
    if isinstance(error, ArchiveGuardTripped):
        metadata["archive_plan"] = dg.MetadataValue.json(
            {"would_archive": error.total, "keys": error.plan}
        )
    if isinstance(error, ErrorBudgetExceeded | ErrorBudgetTripStands):
        metadata["error_budget_trip"] = dg.MetadataValue.json(_trip_metadata(error.trip))
    # A retry won't do (a refused read or write is refused again); one of a run that gave up
    # waiting for the flow would wait again, holding its Dagster run (and its pool's run slot):
    # what it was to sync is requested once it is free.
    stops = (
        ErrorBudgetExceeded
        | ErrorBudgetTripStands
        | ArchiveGuardTripped
        | FlowHeld
        | SourceRefusedRead
        | DestinationRefusedWrite
    )
    retryable = api_facing and not isinstance(error, stops)
    return dg.Failure(description=str(error), metadata=metadata, allow_retries=retryable)


def _trip_metadata(trip: BudgetTrip) -> dict[str, object]:
    """Which run tripped the error budget, when, how many rows failed and why."""
    return {
        "run_id": trip.run_id,
        "tripped_at": trip.tripped_at.isoformat(timespec="seconds"),
        "failed": trip.failed,
        "seen": trip.seen,
        "share": round(trip.share, 4),
        "max_share": trip.max_share,
        "top_reasons": trip.reasons,
        "dead_letters_open": trip.open_letters,
    }


def _transport_metadata(spec: FlowSpec, transport: dict[str, object]) -> dict[str, object]:
    """The API's side of the run: requests, retries, 429s, rate-limit waits, the circuit."""
    if not transport:
        return {}
    circuit = transport.get("circuit") or {}
    return {
        f"{spec.target.system}_api": dg.MetadataValue.json(transport),
        "circuit": str(circuit.get("state", "n/a")),
    }


@functools.cache
def daily_partitions(start: str) -> dg.DailyPartitionsDefinition:
    """One shared definition per start date: flows over the same business dates line up."""
    return dg.DailyPartitionsDefinition(start_date=start)


def partitions_of(spec: FlowSpec) -> dg.DailyPartitionsDefinition | None:
    return daily_partitions(spec.partitions.start) if spec.partitions else None


# A daily partition is materialized once its day is over, so its flow is a day old before its
# next run, plus the time that run may take to start and finish.
DAILY_STALENESS = timedelta(days=1, hours=3)


def max_staleness(spec: FlowSpec) -> timedelta:
    """How long the flow may go without a successful sync: its `max_staleness`, but never less
    than a day and some for a daily-partitioned flow (the default 3 hours alerted every day)."""
    if spec.partitions:
        return max(spec.max_staleness, DAILY_STALENESS)
    return spec.max_staleness


def _run(
    context: dg.AssetExecutionContext,
    spec: FlowSpec,
    config: SyncConfig,
    transport: dict[str, object],
) -> tuple[SyncResult, Drift | None, dg.AssetCheckResult, AuditHead | None]:
    """Sync; `transport` receives the destination's health, whether the sync ends well or not.
    Also the audit anchor's check, and the trail's head after the run's commits."""
    connections = flow_connections(context.resources, spec, log=context.log)
    with connections as (source, destination, state):
        anchor = audit_anchor_check_result(context.instance, asset_key(spec), state)
        try:
            result, drift = _sync_replay_or_repair(
                context, spec, config, source, destination, state
            )
        finally:
            transport.update(destination.health())
            context.log.info("%s transport: %s", spec.target.system, transport)
        return result, drift, anchor, state.audit_head()


def _sync_replay_or_repair(context, spec, config, source, destination, state):
    sync = Sync(
        spec,
        source,
        destination,
        state,
        run_id=context.run.run_id,
        actor=f"dagster run {context.run.run_id}",
        why=trigger_of(context, config),
        log=context.log,
    )
    if config.replay:
        return sync.replay(state.list_dead_letters(flow=spec.name, limit=None)), None
    acknowledged = config.acknowledge_budget_trip
    if config.repair:
        drift = reconcile(spec, source, destination, state)
        result = sync.repair(drift.missing + drift.differing, acknowledged)
        if drift.extra:
            archived = sync.archive_extras(drift.extra_ids, config.allow_mass_archive, result)
            result.counts["archived"] += archived
            if archived < len(drift.extra):
                context.log.warning(
                    "%s: %s",
                    spec.name,
                    EXTRA_LEFT.format(count=len(drift.extra) - archived),
                )
        return result, drift
    if spec.partitions:
        window = context.partition_time_window
        return (
            sync.run_window(window.start, window.end, config.allow_mass_archive, acknowledged),
            None,
        )
    result = sync.run(config.full_refresh, config.allow_mass_archive, acknowledged)
    return result, None


@contextmanager
def backfill_policy_beta_accepted():
    """Dagster 1.13 warns at every load (each process that loads the code location, once per
    partitioned flow) that `@asset`'s `backfill_policy` is in beta. Single-run backfills are
    what STYLE.md asks for and the pinned dagster is what the end-to-end backfill test holds to;
    only that one warning is silenced, and only while a flow's asset is defined."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="Parameter `backfill_policy` of function `asset` is currently in beta",
            category=dg.BetaWarning,
        )
        yield


def flow_asset(spec: FlowSpec) -> dg.AssetsDefinition:
    with backfill_policy_beta_accepted():
        return _flow_asset(spec)


def _flow_asset(spec: FlowSpec) -> dg.AssetsDefinition:
    key = asset_key(spec)
    system = spec.target.system
    api_facing = bool({spec.source.system, system} & API_SYSTEMS)

    @dg.asset(
        key=key,
        group_name=system,
        kinds={"hubspot" if system == "crm" else system, "python"},
        description=spec.description
        or f"{spec.name}: {spec.source.table} → {key.to_user_string()}",
        deps=[source_key(spec)],
        check_specs=[contract_check_spec(spec, key), audit_anchor_check_spec(key)],
        required_resource_keys=required_resources(spec),
        pool=spec.pool,
        partitions_def=partitions_of(spec),
        backfill_policy=dg.BackfillPolicy.single_run() if spec.partitions else None,
        retry_policy=dg.RetryPolicy(
            max_retries=spec.run_retries,
            delay=15,
            backoff=dg.Backoff.EXPONENTIAL,
            jitter=dg.Jitter.PLUS_MINUS,
        )
        if api_facing and spec.run_retries
        else None,
        metadata={"flow": spec.name, "contract": spec.target_contract.label},
        freshness_policy=dg.FreshnessPolicy.time_window(fail_window=max_staleness(spec)),
    )
    def _sync(context: dg.AssetExecutionContext, config: SyncConfig):
        transport: dict[str, object] = {}
        try:
            result, drift, anchor, head = _run(context, spec, config, transport)
        except SyncError as error:
            raise _failure(spec, error, api_facing, transport) from error
        except (SourceUnavailable, StateStoreUnavailable) as error:
            raise dg.Failure(
                description=f"flow {spec.name}: {error}. What to do: nothing was marked synced "
                "that was not written; rerun when it answers again",
                metadata={"flow": spec.name},
                allow_retries=True,
            ) from error
        except SourceReadFailed as error:  # a replay's or a repair's read, not the engine's run
            raise dg.Failure(
                description=f"flow {spec.name}: {error}. What to do: {error.todo}, then rerun",
                metadata={"flow": spec.name},
                allow_retries=False,
            ) from error
        except SourceSchemaError as error:
            raise dg.Failure(
                description=f"flow {spec.name}: {error}. What to do: check "
                f"{database_url_variable(spec.source.system)} and that {spec.source.system} is "
                "seeded (`handoff seed` for the demo ERP) or migrated",
                metadata={"flow": spec.name},
                allow_retries=False,
            ) from error
        except DestinationMismatch as error:
            raise dg.Failure(
                description=str(error), metadata={"flow": spec.name}, allow_retries=False
            ) from error
        metadata = {**_metadata(spec, result), **_transport_metadata(spec, transport)}
        if spec.partitions and not (config.repair or config.replay):
            metadata.update(_days_counted(context))
        if drift is not None:
            metadata.update(
                {f"repair/{name}": value for name, value in drift_metadata(drift).items()}
            )
        if head is not None:  # where the state store's owner cannot rewrite it with the trail
            metadata[AUDIT_HEAD] = str(head)
        return dg.MaterializeResult(
            metadata=metadata, check_results=[contract_check_result(spec, result), anchor]
        )

    return _sync
