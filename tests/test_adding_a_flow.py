"""The README's "Adding a flow": its code block, run as written, is a whole flow (asset, checks,
sensor, schedules) that syncs the real ERP's products into the finance database."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import dagster as dg
import sqlalchemy as sa

from assets.factory import flow_asset
from definitions import active_flows, definitions, resources
from integrations.engine.spec import FlowSpec
from integrations.sql.connect import create_engine

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_flow() -> FlowSpec:
    """The flow the README's section declares, from its one Python block."""
    text = README.read_text()
    section = text[text.index("## Adding a flow") :]
    section = section[: section.index("\n## ", 1)]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    module = types.ModuleType("finance_products")  # a module, as the README's file would be
    sys.modules[module.__name__] = module  # pandera reads the models' annotations through it
    exec(compile(block, "README.md (Adding a flow)", "exec"), module.__dict__)
    return module.FINANCE_PRODUCTS


def metadata(result: dg.ExecuteInJobResult) -> dict[str, object]:
    (event,) = result.get_asset_materialization_events()
    return {key: value.value for key, value in event.materialization.metadata.items()}


def test_the_readmes_new_flow_runs_as_written(world):
    spec = readme_flow()
    defs = definitions([*active_flows(), spec])
    assert defs.resolve_sensor_def("erp_products_changed")
    assert defs.resolve_schedule_def(f"{spec.name}_schedule")
    key = dg.AssetKey(["finance", "products"])
    assert dg.AssetCheckKey(key, "reconciliation") in defs.resolve_asset_graph().asset_check_keys

    erp = create_engine(world.erp_url)
    with erp.connect() as connection:
        prices = dict(
            connection.execute(
                sa.text("SELECT sku, unit_price FROM products WHERE deleted_at IS NULL")
            ).all()
        )
    erp.dispose()
    with dg.instance_for_test() as instance:
        first = dg.materialize([flow_asset(spec)], resources=resources(), instance=instance)
        assert first.success
        assert metadata(first)["inserted"] == len(prices) > 0
        again = dg.materialize([flow_asset(spec)], resources=resources(), instance=instance)
        assert metadata(again)["written"] == 0
    finance = create_engine(f"sqlite:///{world.home / 'finance.sqlite'}")
    with finance.connect() as connection:
        reported = dict(connection.execute(sa.text("SELECT sku, unit_price FROM products")).all())
    finance.dispose()
    assert reported == {sku: float(price) for sku, price in prices.items()}
