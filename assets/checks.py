"""A flow's checks: its contract and the audit trail's anchor (evaluated by every sync) and a
daily reconciliation (on its own, never along with a sync)."""

import dagster as dg

from assets.connections import flow_connections, required_resources
from integrations.engine.destination import DestinationMismatch
from integrations.engine.reconcile import Drift, reconcile
from integrations.engine.spec import FlowSpec
from integrations.engine.state import AuditHead, StateStore
from integrations.engine.sync import SyncResult

CONTRACT_CHECK = "contract"
AUDIT_ANCHOR_CHECK = "audit_anchor"
AUDIT_HEAD = "audit_head"  # the materialization's metadata: the trail's head after its run
RECONCILIATION_CHECK = "reconciliation"
SYNC_CHECKS = (CONTRACT_CHECK, AUDIT_ANCHOR_CHECK)  # the asset's own, evaluated by every sync
SAMPLE = 5


def reconciliation_schedule_name(spec: FlowSpec) -> str:
    return f"{spec.name}_reconciliation_schedule"


def reconciliation_op_name(key: dg.AssetKey) -> str:
    """The reconciliation check's op: the step a failed run of it names."""
    return f"{key.to_python_identifier()}_{RECONCILIATION_CHECK}"


def contract_check_spec(spec: FlowSpec, key: dg.AssetKey) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        CONTRACT_CHECK,
        asset=key,
        description=f"Every row satisfies {spec.source_contract.label} and "
        f"{spec.target_contract.label}; failures are dead-lettered with their reason.",
    )


def contract_check_result(spec: FlowSpec, result: SyncResult) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=CONTRACT_CHECK,
        passed=result.counts["rejected"] == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "valid": int(result.counts["valid"]),
            "rejected": int(result.counts["rejected"]),
            "reasons": dg.MetadataValue.json(dict(result.reasons.most_common(10))),
            "samples": dg.MetadataValue.json(result.samples),
            "contract": spec.target_contract.label,
        },
    )


def audit_anchor_check_spec(key: dg.AssetKey) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        AUDIT_ANCHOR_CHECK,
        asset=key,
        description="The state store's audit trail still holds the head (newest entry) this "
        "asset's previous materialization recorded as `audit_head`: fails when the trail's "
        "newest entries were removed, which its hash chain alone cannot show.",
    )


def audit_anchor_check_result(
    instance: dg.DagsterInstance, key: dg.AssetKey, state: StateStore
) -> dg.AssetCheckResult:
    """The head the asset's latest materialization recorded, judged against the trail as a run
    starts (its own entries could take the removed entries' ids on SQLite)."""
    event = instance.get_latest_materialization_event(key)
    recorded = event.asset_materialization.metadata.get(AUDIT_HEAD) if event else None
    if recorded is None:
        return dg.AssetCheckResult(
            check_name=AUDIT_ANCHOR_CHECK,
            passed=True,
            description=f"no materialization of {key.to_user_string()} recorded the audit "
            "trail's head yet: this run records the first",
        )
    head = AuditHead.parse(recorded.value)
    problem = state.audit_head_problem(head)
    if problem is None:
        description = (
            f"the trail still holds entry {head.id}, its head as run {event.run_id} saw it"
        )
    else:
        description = (
            f"{problem} (run {event.run_id} recorded it). What to do: treat the trail from there "
            "on as untrusted and investigate who changed the state database (`handoff audit "
            f"verify --head {head}` walks the whole trail against it); if HANDOFF_STATE_URL "
            "names another state database than that run's, this run anchors the new one"
        )
    return dg.AssetCheckResult(
        check_name=AUDIT_ANCHOR_CHECK,
        passed=problem is None,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata={"head_recorded": str(head), "recorded_by_run": event.run_id},
    )


def drift_metadata(drift: Drift) -> dict[str, object]:
    """Counts, digests and the first few drifted keys (record keys, never PII values)."""
    return {
        "source_count": drift.source_count,
        "destination_count": drift.destination_count,
        "source_digest": drift.source_digest,
        "destination_digest": drift.destination_digest,
        "missing": len(drift.missing),
        "differing": len(drift.differing),
        "extra": len(drift.extra),
        "first_drifted": dg.MetadataValue.json(
            {
                "missing": drift.missing[:SAMPLE],
                "differing": drift.differing[:SAMPLE],
                "extra": drift.extra[:SAMPLE],
            }
        ),
    }


def reconciliation_check(spec: FlowSpec, key: dg.AssetKey) -> dg.AssetChecksDefinition:
    """Reads the whole source and destination, so it runs on its own (its daily schedule, or
    the check executed from the UI), not along with a materialization of its asset: the UI's
    Materialize selects every check of the asset, and a can-subset check may leave its result
    out (Dagster shows it skipped in that run)."""

    @dg.multi_asset_check(
        name=reconciliation_op_name(key),
        specs=[
            dg.AssetCheckSpec(
                RECONCILIATION_CHECK,
                asset=key,
                description=f"Compares the source with {key.to_user_string()}: counts and a "
                "content hash over keys; reports missing, extra and differing records. Reads "
                "both whole, so it runs daily on its own schedule (or execute the check alone), "
                "not with each materialization.",
                blocking=False,
            )
        ],
        can_subset=True,
        required_resource_keys=required_resources(spec),
    )
    def _reconciliation(context: dg.AssetCheckExecutionContext):
        if key in context.job_def.asset_layer.selected_asset_keys:
            context.log.info(
                "%s: reconciliation skipped in a run that materializes %s (it reads the whole "
                "destination): its schedule `%s` runs it, or execute the check on its own",
                spec.name,
                key.to_user_string(),
                reconciliation_schedule_name(spec),
            )
            return
        try:
            with flow_connections(context.resources, spec) as (source, destination, state):
                drift = reconcile(spec, source, destination, state)
        except DestinationMismatch as error:
            raise dg.Failure(
                description=f"flow {spec.name}: {error}", metadata={"flow": spec.name}
            ) from error
        yield dg.AssetCheckResult(
            asset_key=key,
            check_name=RECONCILIATION_CHECK,
            passed=drift.in_sync,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join([f"{spec.name}: {drift.summary()}", *what_to_do(drift, key)]),
            metadata=drift_metadata(drift),
        )

    return _reconciliation


# A repair archives the extras this flow wrote for records the source no longer has (a row
# deleted outright, which no run reads); what handoff never wrote it leaves alone.
EXTRA_LEFT = (
    "{count} extra records are no record's this flow wrote, or their source rows still exist "
    "(a repair leaves them): check each (first_drifted lists the first) and archive it in the "
    "destination yourself"
)


def what_to_do(drift: Drift, key: dg.AssetKey) -> list[str]:
    """What repairs the drift: a repair run sends the missing and differing records again, and
    archives the extras this flow wrote whose source rows are gone."""
    if drift.in_sync:
        return []
    return [
        f"to repair, materialize {key.to_user_string()} with run config `repair: true` (it "
        "sends the missing and differing records again, and archives the extra ones this flow "
        "wrote whose source rows were deleted; any other extra it leaves, and says so)"
    ]
