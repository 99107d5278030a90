"""Markdown tables, as the model card writes them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def cell(value: Any) -> str:
    """A value as one table cell: floats to 4 significant digits, None empty, and no `|`, which
    would split the cell in two."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "/")


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The header, its rule and one line per row, each cell through `cell`."""
    def line(values: Iterable[Any]) -> str:
        return "| " + " | ".join(cell(v) for v in values) + " |"
    return [line(columns), "|" + "---|" * len(columns), *(line(row) for row in rows)]
