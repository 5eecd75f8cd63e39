"""handoff's framework-free engine and connectors (no dagster imports here)."""
