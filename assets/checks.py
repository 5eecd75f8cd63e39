"""A flow's checks: its contract (evaluated by every sync) and a daily reconciliation."""

import dagster as dg

from assets.connections import flow_connections, required_resources
from integrations.engine.reconcile import Drift, reconcile
from integrations.engine.spec import FlowSpec
from integrations.engine.sync import SyncResult

CONTRACT_CHECK = "contract"
RECONCILIATION_CHECK = "reconciliation"
SAMPLE = 5


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
    @dg.asset_check(
        asset=key,
        name=RECONCILIATION_CHECK,
        description=f"Compares the source with {key.to_user_string()}: counts and a content hash "
        "over keys; reports missing, extra and differing records.",
        required_resource_keys=required_resources(spec),
        blocking=False,
    )
    def _reconciliation(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        with flow_connections(context.resources, spec) as (source, destination, state):
            drift = reconcile(spec, source, destination, state)
        return dg.AssetCheckResult(
            passed=drift.in_sync,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join([f"{spec.name}: {drift.summary()}", *what_to_do(drift, key)]),
            metadata=drift_metadata(drift),
        )

    return _reconciliation


# The engine archives what the source soft-deletes; a row deleted outright leaves no row to
# read, and no repair archives it.
EXTRA_NOT_REPAIRED = (
    "a repair does not archive the {count} extra records (live in the destination, not in the "
    "source: a row deleted outright there, or a record handoff never wrote); check each "
    "(first_drifted lists the first) and archive it in the destination yourself"
)


def what_to_do(drift: Drift, key: dg.AssetKey) -> list[str]:
    """What repairs the drift: a repair run sends the missing and differing records again; it
    archives no extra record (it told the operator to repair extras, and changed nothing)."""
    todo = []
    if drift.missing or drift.differing:
        todo.append(
            f"to send the missing and differing records again, materialize "
            f"{key.to_user_string()} with run config `repair: true`"
        )
    if drift.extra:
        todo.append(EXTRA_NOT_REPAIRED.format(count=len(drift.extra)))
    return todo
