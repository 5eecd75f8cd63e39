"""SQL sources and destinations (SQLAlchemy 2 Core)."""
