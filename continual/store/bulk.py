"""Batched inserts straight to the driver's ``executemany`` (samples, the prediction log)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Dialect, Table, bindparam, insert


@lru_cache(maxsize=16)
def _compiled_insert(dialect: Dialect, table: Table) -> tuple[str, tuple[str, ...], tuple[Any, ...], bool]:
    # Every column but an autoincrement integer key.
    columns = [c for c in table.c if not (c.primary_key and c.autoincrement is True)]
    stmt = insert(table).inline().values({c.name: bindparam(c.name) for c in columns})
    compiled = stmt.compile(dialect=dialect)
    names = tuple(compiled.positiontup or ()) if compiled.positional else tuple(c.name for c in columns)
    processors = tuple(table.c[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names)
    return str(compiled), names, processors, bool(compiled.positional)


def insert_rows(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]] | Sequence[tuple[Any, ...]],
    *,
    columns: tuple[str, ...] | None = None,
    raw: frozenset[str] = frozenset(),
) -> None:
    """executemany straight to the driver: SQLAlchemy's per-row parameter building
    costs more than SQLite's insert itself.

    ``rows`` are dicts by column name, or — with ``columns``, their names in order — tuples,
    which need no dict per row (the prediction log's hot path). Column types still convert
    values, except in the ``raw`` columns (values the caller already put in the driver's
    form, e.g. JSON text or a float).
    """
    sql, names, processors, positional = _compiled_insert(conn.dialect, table)
    if columns is None:
        values = [[row[n] for n in names] for row in rows]  # type: ignore[call-overload]
    else:
        missing = [n for n in names if n not in columns]
        if missing:
            raise ValueError(f"insert into {table.name}: no value for column(s) {', '.join(missing)}")
        index = [columns.index(n) for n in names]
        same_order = index == list(range(len(columns)))
        values = [list(row) if same_order else [row[i] for i in index] for row in rows]
    to_convert = [(i, f) for i, f in enumerate(processors) if f is not None and names[i] not in raw]
    converted: dict[int, Any] = {}  # by id(): a batch shares one timestamp, convert it once
    for row_values in values:
        for i, process in to_convert:
            value = row_values[i]
            if value is not None:  # None stays SQL NULL, not JSON 'null'
                key = id(value)
                if key not in converted:
                    converted[key] = process(value)
                row_values[i] = converted[key]
    params: list[Any] = [tuple(v) for v in values] if positional else [dict(zip(names, v, strict=True)) for v in values]
    conn.exec_driver_sql(sql, params)
