"""Does a destination table fit a flow? Checked against the reflected schema before the first write.

A SQL destination table holds one column per field of the flow's target contract, keyed by the
target's `id_property` (its primary key, or a single-column unique constraint), plus
`archived_at`: a nullable timestamp, NULL for a live record and the time of archiving for a
record soft-deleted in the source or out of the flow's scope (it is set back to NULL when the
record comes back). Other columns are allowed if the database can fill them (nullable, or with a
default). A missing table can be created from the contract (`create_table`).

A fixed-point column (NUMERIC/DECIMAL(p, s)) fits a number field, but not every number: PostgreSQL
and MariaDB round extra decimals without a word. `beyond_fixed_point` finds the values such a
column would not keep as sent, so that they are refused rather than stored changed; likewise
`beyond_exact_floats` for whole numbers in a floating-point column. A 4-byte float column (REAL,
MariaDB's FLOAT) keeps about 7 digits: it does not fit a number field at all. Nor does a partial
unique index (WHERE …) make the key unique, nor a DEFERRABLE constraint (PostgreSQL's ON CONFLICT
takes none as its arbiter). A key field is a whole number or text; its column may be any type
that holds it (a NUMERIC or DOUBLE key is matched by value; a native UUID column holds a UUID's
text, as any str field's).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from integrations.contracts import Contract
from integrations.contracts.contract import kind_of
from integrations.engine.destination import DestinationMismatch
from integrations.engine.spec import FlowSpec

ARCHIVED_AT = "archived_at"
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# What each contract dtype may be stored in (by the reflected column's Python type).
_FITS: dict[str, tuple[type, ...]] = {
    # ISO dates as text land in DATE/TIMESTAMP columns too, a UUID's text in a UUID column
    "str": (str, date, datetime, uuid.UUID),
    "int": (int, Decimal, float),
    "float": (float, Decimal),
    "bool": (bool, int),
    "datetime": (datetime,),
    "date": (date, str),
}
# MariaDB/MySQL's DATETIME keeps whole seconds unless told otherwise.
MICROSECOND_DATETIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_CREATED_TYPES: dict[str, sa.types.TypeEngine] = {
    "int": sa.BigInteger(),
    "float": sa.Float(53),
    "bool": sa.Boolean(),
    "datetime": MICROSECOND_DATETIME,
    "date": sa.Date(),
}
EXACT_FLOAT_INTEGERS = 2**53  # a double holds every whole number up to this, and not all beyond


def holds_bools(column: sa.Column) -> bool:
    """A BOOLEAN column, or MariaDB/MySQL's TINYINT(1), which is what they make of one."""
    if isinstance(column.type, mysql.TINYINT):
        return column.type.display_width == 1
    return python_type(column) is bool


def python_type(column: sa.Column) -> type | None:
    try:
        return column.type.python_type
    except NotImplementedError:
        return None


def check_identifier(flow: str, name: str) -> str:
    if not IDENTIFIER.fullmatch(name):
        raise DestinationMismatch(
            f"flow {flow}: {name!r} is not a plain SQL identifier. What to do: name destination "
            "tables and fields with letters, digits and underscores"
        )
    return name


def create_table(engine: sa.Engine, spec: FlowSpec) -> sa.Table:
    """The destination table the contract describes, created if it is missing."""
    contract, key = spec.target_contract, spec.target.id_property
    if ARCHIVED_AT in contract.schema.columns:
        column, problem, todo = _ARCHIVED_FIELD
        raise DestinationMismatch(
            f"flow {spec.name}: field {column!r} of {contract.label}: {problem}. What to do: {todo}"
        )
    columns = []
    for name, field in contract.schema.columns.items():
        check_identifier(spec.name, name)
        kind = kind_of(contract, name)
        # Keys need a bounded length on MariaDB; other text is unbounded.
        type_ = _CREATED_TYPES.get(kind) or (sa.String(255) if name == key else sa.Text())
        columns.append(
            sa.Column(name, type_, primary_key=name == key, nullable=bool(field.nullable))
        )
    columns.append(sa.Column(ARCHIVED_AT, _CREATED_TYPES["datetime"], nullable=True))
    table = sa.Table(check_identifier(spec.name, spec.target.dataset), sa.MetaData(), *columns)
    table.create(engine, checkfirst=True)
    return table


def reflect_fitting_table(engine: sa.Engine, spec: FlowSpec) -> sa.Table:
    """The reflected destination table, or DestinationMismatch naming the flow, table and column."""
    name = spec.target.dataset
    try:
        table = sa.Table(name, sa.MetaData(), autoload_with=engine)
    except sa.exc.NoSuchTableError:
        raise DestinationMismatch(
            f"flow {spec.name}: the destination has no table {name!r}. What to do: create it "
            f"with a column per field of {spec.target_contract.label}, {spec.target.id_property!r} "
            f"as primary key and a nullable timestamp {ARCHIVED_AT!r}, or let handoff create it "
            "(create_missing_tables)"
        ) from None
    problems = _misfits(engine, table, spec)
    if problems:
        column, problem, todo = problems[0]
        more = f" ({len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DestinationMismatch(
            f"flow {spec.name}: destination table {name!r}, column {column!r}: {problem}{more}. "
            f"What to do: {todo}"
        )
    return table


def _misfits(engine: sa.Engine, table: sa.Table, spec: FlowSpec) -> list[tuple[str, str, str]]:
    contract, key = spec.target_contract, spec.target.id_property
    label = contract.label
    problems: list[tuple[str, str, str]] = []
    for name, field in contract.schema.columns.items():
        if name not in table.c:
            problems.append((name, f"missing ({label} has it)", f"add the column {name!r}"))
            continue
        column, kind = table.c[name], kind_of(contract, name)
        stored = python_type(column)
        if column.computed is not None:
            problems.append(
                (
                    name,
                    "a generated column: the database computes it, no record can write it",
                    "leave the field out of the contract, or make the column a plain one",
                )
            )
        if kind == "int" and holds_bools(column):  # a bool is an int to Python, not to a reader
            problems.append(
                (
                    name,
                    f"type {column.type} keeps only true and false, not the contract's int values",
                    "make the column an integer type, or the field bool in the contract",
                )
            )
        elif stored is not None and not issubclass(stored, _FITS[kind]):
            problems.append(
                (
                    name,
                    f"type {column.type} cannot hold the contract's {kind} values",
                    f"change the column to a {kind} type, or the contract",
                )
            )
        if kind in ("int", "float") and _single_precision(engine, column):
            problems.append(
                (
                    name,
                    f"type {column.type} keeps about 7 significant digits: the contract's "
                    f"{kind} values would be stored rounded",
                    "make it double precision (or NUMERIC)",
                )
            )
        if field.nullable and not column.nullable:
            problems.append(
                (
                    name,
                    f"NOT NULL, but {label} allows nulls",
                    "make the column nullable, or the contract field required",
                )
            )
    if key in contract.schema.columns and kind_of(contract, key) == "float":
        # Number keys are matched by value ("1" for 1.0): a float key's text would not be
        # the one reconciliation expects, and float keys rarely survive arithmetic anyway.
        problems.append(
            (
                key,
                f"the key is a float field of {label}: keys are whole numbers or text",
                "declare the key int (or str) in the contract",
            )
        )
    if ARCHIVED_AT in contract.schema.columns:
        problems.append(_ARCHIVED_FIELD)
    if key in table.c and python_type(table.c[key]) is datetime:
        problems.append(
            (
                key,
                f"type {table.c[key].type} as the key: a time's text is not one (a date's, "
                "a whole number's or a text's is)",
                "make the key column text, a date or an integer",
            )
        )
    loose = _loose_comparison(engine, table, key) if key in table.c else None
    if loose:
        problems.append(
            (
                key,
                f"{loose}: two records whose keys differ only in case or trailing spaces would "
                "be written into one row",
                "make the key column text compared exactly (varchar or text, without a "
                "case-insensitive collation)",
            )
        )
    for columns in _replacing_constraints(engine, table, key):
        problems.append(
            (
                columns,
                "unique with ON CONFLICT REPLACE: a record holding another row's value would "
                "delete that row without a word, not be refused",
                "make the table again without ON CONFLICT REPLACE (SQLite cannot alter it)",
            )
        )
    if key in table.c and not _is_unique(engine, table, key):
        problems.append(
            (
                key,
                "not the primary key nor unique: an upsert by it would duplicate records",
                f"make {key!r} the primary key or add a unique constraint on it alone",
            )
        )
    deferrable = _deferrable_key(engine, table, key) if key in table.c else None
    if deferrable:
        problems.append(
            (
                key,
                f"its constraint {deferrable!r} is DEFERRABLE, which PostgreSQL's ON CONFLICT "
                "cannot take as its arbiter: no record could be updated",
                f"drop {deferrable!r} and add it again without DEFERRABLE (PostgreSQL cannot "
                "alter it so)",
            )
        )
    archived = table.c.get(ARCHIVED_AT)
    if archived is None or not archived.nullable or python_type(archived) is not datetime:
        problems.append(
            (
                ARCHIVED_AT,
                "missing, or not a nullable timestamp (it marks archived records)",
                f"add a nullable timestamp column {ARCHIVED_AT!r}",
            )
        )
    for column in table.c:
        fillable = (
            column.nullable
            or column.server_default is not None
            or column.autoincrement is True
            or column.identity is not None
            or column.computed is not None
        )
        if column.name not in contract.schema.columns and not fillable:
            problems.append(
                (
                    column.name,
                    f"NOT NULL without a default, and not in {label}",
                    "give it a default, make it nullable, or add it to the contract",
                )
            )
    return problems


def _single_precision(engine: sa.Engine, column: sa.Column) -> bool:
    """A 4-byte float column (PostgreSQL REAL, MariaDB FLOAT); SQLite's REAL has 8 bytes."""
    if engine.dialect.name in ("mysql", "mariadb"):
        return isinstance(column.type, mysql.FLOAT)
    return engine.dialect.name == "postgresql" and isinstance(column.type, sa.REAL)


_ARCHIVED_FIELD = (
    ARCHIVED_AT,
    "handoff keeps this column for itself (it marks archived records), so no field may be named so",
    f"rename the field in the contract and the flow's mapping (not {ARCHIVED_AT!r})",
)


def _loose_comparison(engine: sa.Engine, table: sa.Table, key: str) -> str | None:
    """How the key column compares text other than exactly, if it does: PostgreSQL's citext or
    a nondeterministic collation; a SQLite key index's NOCASE or RTRIM collation. (MariaDB
    refuses the second of two such keys as a duplicate; a CHAR(n) key is read without its
    padding, and a key ending in a space refused, by the destination.)"""
    column = table.c[key]
    if engine.dialect.name == "postgresql":
        if isinstance(column.type, postgresql.CITEXT):
            return "type citext compares keys without case"
        collation = getattr(column.type, "collation", None)
        if collation:
            with engine.connect() as connection:
                exact = connection.execute(
                    sa.text(
                        "SELECT bool_and(collisdeterministic) FROM pg_collation "
                        "WHERE collname = :name"
                    ),
                    {"name": collation},
                ).scalar()
            if exact is False:
                return f"collation {collation!r} compares keys loosely"
    elif engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            quote = engine.dialect.identifier_preparer.quote
            for index in connection.exec_driver_sql(f"PRAGMA index_list({quote(table.name)})"):
                if not index[2]:  # not unique
                    continue
                rows = connection.exec_driver_sql(f"PRAGMA index_xinfo({quote(index[1])})").all()
                keyed = [row for row in rows if row[5]]  # the index's key columns
                if [row[2] for row in keyed] == [key] and keyed[0][4].upper() != "BINARY":
                    return f"collation {keyed[0][4]} compares keys loosely"
    return None


def _replacing_constraints(engine: sa.Engine, table: sa.Table, key: str) -> list[str]:
    """The columns (as "a, b") of each SQLite UNIQUE or PRIMARY KEY constraint but the key's
    alone declared ON CONFLICT REPLACE: the upsert's ON CONFLICT (key) does not cover it."""
    if engine.dialect.name != "sqlite":
        return []
    with engine.connect() as connection:
        declared = connection.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table.name,)
        ).scalar()
    found = []
    for definition in _top_level_parts(declared or ""):
        if not _REPLACES.search(definition):
            continue
        constraint = _TABLE_CONSTRAINT.match(definition)
        names = constraint[1].split(",") if constraint else [definition]
        columns = [_NAME.match(name)[1].strip('"`[]') for name in names]  # no COLLATE, ASC
        if columns != [key]:
            found.append(", ".join(columns))
    return found


def _top_level_parts(declared: str) -> list[str]:
    """A CREATE TABLE's column and constraint definitions: its body split at the commas outside
    parentheses and quotes."""
    body = declared[declared.find("(") + 1 : declared.rfind(")")]
    parts, depth, quote, start = [], 0, "", 0
    for at, char in enumerate(body):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'`[":
            quote = "]" if char == "[" else char
        elif char in "()":
            depth += 1 if char == "(" else -1
        elif char == "," and depth == 0:
            parts.append(body[start:at])
            start = at + 1
    return [*parts, body[start:]]


_REPLACES = re.compile(r"\b(UNIQUE|PRIMARY\s+KEY)\b.*\bON\s+CONFLICT\s+REPLACE\b", re.I | re.S)
_TABLE_CONSTRAINT = re.compile(
    r"\s*(?:CONSTRAINT\s+\S+\s+)?(?:UNIQUE|PRIMARY\s+KEY)\s*\(([^)]*)\)", re.I
)
_NAME = re.compile(r"\s*(\"[^\"]+\"|`[^`]+`|\[[^\]]+\]|\S+)")


def _is_unique(engine: sa.Engine, table: sa.Table, key: str) -> bool:
    """The key alone is the primary key, or unique over all rows: a partial unique index (WHERE)
    is not, and PostgreSQL's ON CONFLICT does not take it."""
    if [column.name for column in table.primary_key.columns] == [key]:
        return True
    inspector = sa.inspect(engine)
    constraints = inspector.get_unique_constraints(table.name)
    indexes = [
        index
        for index in inspector.get_indexes(table.name)
        if index.get("unique")
        and not any(
            where is not None
            for option, where in (index.get("dialect_options") or {}).items()
            if option.endswith("_where")
        )
    ]
    return any(item["column_names"] == [key] for item in [*constraints, *indexes])


def _deferrable_key(engine: sa.Engine, table: sa.Table, key: str) -> str | None:
    """The name of a DEFERRABLE primary key or unique constraint on the key alone (PostgreSQL):
    ON CONFLICT refuses it as an arbiter, even beside a unique index that is not."""
    if engine.dialect.name != "postgresql":  # MariaDB has none; SQLite defers foreign keys only
        return None
    with engine.connect() as connection:
        return connection.execute(
            sa.text(
                "SELECT con.conname FROM pg_constraint con "
                "JOIN pg_attribute att ON att.attrelid = con.conrelid "
                "AND att.attnum = con.conkey[1] "
                "WHERE con.conrelid = CAST(:table AS regclass) AND con.contype IN ('p', 'u') "
                "AND con.condeferrable AND cardinality(con.conkey) = 1 AND att.attname = :key "
                "LIMIT 1"
            ),
            {"table": engine.dialect.identifier_preparer.quote(table.name), "key": key},
        ).scalar()


def float_columns_of_integers(table: sa.Table, contract: Contract) -> list[str]:
    """The contract's int fields whose column is floating-point (it rounds big whole numbers)."""
    return [
        name
        for name in contract.schema.columns
        if kind_of(contract, name) == "int" and isinstance(table.c[name].type, sa.Float)
    ]


def beyond_exact_floats(values: Sequence[object]) -> dict[int, str]:
    """The whole numbers a double would not keep exactly, by position."""
    return {
        at: f"is a whole number beyond {EXACT_FLOAT_INTEGERS:,}, which a float column rounds"
        for at, value in enumerate(values)
        if isinstance(value, int)
        and not isinstance(value, bool)
        and abs(value) > EXACT_FLOAT_INTEGERS
        and int(float(value)) != value
    }


def infinite_numbers(values: Sequence[object]) -> list[int]:
    """The positions of ±Infinity, which no MariaDB/MySQL column holds (PyMySQL refused the
    whole statement, naming no column)."""
    return [
        at
        for at, value in enumerate(values)
        if isinstance(value, float | Decimal) and value in (math.inf, -math.inf)
    ]


def fixed_point_columns(table: sa.Table, contract: Contract) -> dict[str, tuple[int, int]]:
    """The contract's number fields whose column is fixed-point, by name: (precision, scale).
    NUMERIC(p) is NUMERIC(p, 0), as SQL has it; NUMERIC without a precision keeps any value.
    MariaDB's DOUBLE(p, s) and FLOAT(p, s) are floating-point, yet round every value to s
    decimals without a word (even in strict mode): fixed-point as far as a value is kept."""
    found: dict[str, tuple[int, int]] = {}
    for name in contract.schema.columns:
        stored = table.c[name].type
        scaled_float = isinstance(stored, sa.Float) and getattr(stored, "scale", None) is not None
        if (
            ((isinstance(stored, sa.Numeric) and not isinstance(stored, sa.Float)) or scaled_float)
            and stored.precision is not None
            and kind_of(contract, name) in ("int", "float")
        ):
            found[name] = (stored.precision, stored.scale or 0)
    return found


def beyond_fixed_point(values: Sequence[object], precision: int, scale: int) -> dict[int, str]:
    """What a NUMERIC(precision, scale) column would not keep as sent, by position: a value with
    more decimals than `scale` (it would be stored rounded), or with more digits before the point
    than the column has room for. Nulls and what is not a finite number are the database's to
    judge."""
    room = 10 ** (precision - scale)
    found: dict[int, str] = {}
    for at, value in enumerate(values):
        if not isinstance(value, (int, float, Decimal)) or isinstance(value, bool):
            continue
        if isinstance(value, float | Decimal) and not math.isfinite(value):
            continue
        if round(value, scale) != value:
            found[at] = f"has more than {scale} decimals, and the column would store it rounded"
        elif abs(value) >= room:
            found[at] = f"has more than {precision - scale} digits before the decimal point"
    return found


def beyond_packet(
    columns: Mapping[str, Sequence[object]], texts: Sequence[str], packet: int
) -> dict[int, str]:
    """The records too large for one MariaDB/MySQL statement, by position: their text fields
    (`texts`), as PyMySQL sends them (UTF-8, escaped), with room for the statement and the other
    values, exceed the server's `packet` (max_allowed_packet; it closes the connection on a
    larger one). Measured only when the chunk's longest texts together could be: at most 4
    bytes a character, escaped 8."""
    room = packet - _STATEMENT_ROOM - _VALUE_ROOM * len(columns)
    longest = [
        max((len(v) for v in columns[name] if isinstance(v, str)), default=0) for name in texts
    ]
    if _MOST_BYTES * sum(longest) <= room:
        return {}
    found: dict[int, str] = {}
    for at in range(len(columns[texts[0]])):
        values = {name: columns[name][at] for name in texts}
        if _MOST_BYTES * sum(len(v) for v in values.values() if isinstance(v, str)) <= room:
            continue
        sizes = {name: _escaped_size(value) for name, value in values.items()}
        if sum(sizes.values()) > room:
            widest = max(sizes, key=sizes.__getitem__)
            found[at] = (
                f"is {sum(sizes.values()):,} bytes as sent (column {widest!r}: "
                f"{sizes[widest]:,}), more than the server's max_allowed_packet of {packet:,} "
                "takes in one statement"
            )
    return found


def _escaped_size(value: object) -> int:
    """A text's bytes in a statement: UTF-8, and a backslash before each escaped character."""
    if not isinstance(value, str):
        return 0
    return len(value.encode("utf-8", "surrogatepass")) + sum(map(value.count, _MYSQL_ESCAPED))


_MYSQL_ESCAPED = ("\\", "'", '"', "\0", "\n", "\r", "\x1a")  # PyMySQL's escape_string
_MOST_BYTES = 8  # a character's most bytes in a statement: 4 in UTF-8, escaped twice as many
_STATEMENT_ROOM = 4096  # INSERT INTO … (…) VALUES, the names of the table and its columns
_VALUE_ROOM = 64  # a value's quotes and comma, or a number's or a time's text


def bounded_text_columns(table: sa.Table, contract: Contract) -> dict[str, int]:
    """The contract's text fields whose column holds at most so many characters (VARCHAR(n),
    CHAR(n)), by name: their length. PostgreSQL and MariaDB refuse a longer text, unless what is
    beyond the length is spaces: those they cut without a word. (SQLite keeps any text.)"""
    return {
        name: stored.length
        for name in contract.schema.columns
        if kind_of(contract, name) == "str"
        and isinstance(stored := table.c[name].type, sa.String)
        and not isinstance(stored, sa.Enum)  # its values are the database's to judge
        and stored.length is not None
    }


def coarse_time_columns(table: sa.Table, contract: Contract) -> dict[str, int]:
    """The contract's date-and-time fields (and text fields, holding a time's ISO text) whose
    column keeps less than microseconds, by name: the digits of a second's fraction it keeps. A
    MariaDB DATETIME or TIMESTAMP keeps none unless declared with them (it cuts the rest), a
    PostgreSQL timestamp(p) keeps p (it rounds)."""
    found: dict[str, int] = {}
    for name in contract.schema.columns:
        stored = table.c[name].type
        # A str field's time text is cut or rounded by the column as a datetime field's is.
        if kind_of(contract, name) not in ("datetime", "str") or not isinstance(
            stored, sa.DateTime
        ):
            continue
        if isinstance(stored, mysql.DATETIME | mysql.TIMESTAMP):
            digits = stored.fsp or 0
        elif isinstance(stored, postgresql.TIMESTAMP):
            digits = 6 if stored.precision is None else stored.precision
        else:
            continue
        if digits < 6:
            found[name] = digits
    return found


def beyond_time_precision(values: Sequence[object], digits: int) -> dict[int, str]:
    """The times (ISO text, as records carry them) with a fraction of a second finer than
    `digits`, by position."""
    found: dict[int, str] = {}
    for at, value in enumerate(values):
        fraction = _FRACTION.match(value) if isinstance(value, str) else None
        if fraction and fraction[1][digits:].strip("0"):
            found[at] = (
                f"has a finer fraction of a second than the {digits} digits the column keeps"
            )
    return found


_FRACTION = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d\.(\d+)")
