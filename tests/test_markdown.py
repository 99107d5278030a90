"""The markdown tables of the model card."""

import pytest

from components.report.tables import cell, table


@pytest.mark.parametrize("value, shown", [
    (0.97771234, "0.9777"),
    (1e-05, "1e-05"),
    (3, "3"),
    (None, ""),
    ("a|b", "a/b"),  # a | inside a cell would split it in two
    ("**best**", "**best**"),
])
def test_cell(value, shown):
    assert cell(value) == shown


def test_table_has_a_rule_and_a_line_per_row():
    assert table(["class", "F1"], [("cat|dog", 0.5), ("bird", None)]) == [
        "| class | F1 |", "|---|---|", "| cat/dog | 0.5 |", "| bird |  |"]
    assert table(["a"], []) == ["| a |", "|---|"]
