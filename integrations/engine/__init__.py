"""The sync engine: extract, validate, map, diff, load, commit, delete (DESIGN.md, steps 1–7)."""
