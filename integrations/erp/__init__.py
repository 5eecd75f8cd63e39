"""The demo ERP, the system of record: its schema, seeding and a change simulator."""
