"""The report's CSV tables: one writer, a header of the table's columns, floats to 4 decimals, NaN empty."""

from __future__ import annotations

import csv
import math

from visiontune.evaluation.report import (
    PER_CLASS_COLUMNS,
    PER_LABEL_COLUMNS,
    per_class_rows,
    write_per_class_csv,
    write_per_label_csv,
)


def read(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_per_class_csv_holds_the_rows_in_the_columns_order(tmp_path):
    rows = per_class_rows([[3, 1], [0, 2]], ["cat", "dog"])
    write_per_class_csv(rows, tmp_path / "per_class.csv")
    header, cat, dog = read(tmp_path / "per_class.csv")
    assert tuple(header) == PER_CLASS_COLUMNS
    assert cat == ["cat", "4", "1.0000", "0.7500", "0.8571", "dog", "1"]
    assert dog == ["dog", "2", "0.6667", "1.0000", "0.8000", "", "0"]


def test_per_label_csv_leaves_what_a_row_does_not_have_empty(tmp_path):
    rows = [
        {"head": "kind", "label": "cat", "support": 4, "ap": math.nan, "threshold": math.nan,
         "precision": 0.5, "recall": 1 / 3, "f1": 0.4},
        {"head": "tags", "label": "red", "support": 2, "ap": 0.75, "threshold": 0.3,
         "precision": 1.0, "recall": 0.5, "f1": 2 / 3},
    ]  # fmt: skip
    write_per_label_csv(rows, tmp_path / "per_label.csv")
    header, kind, tags = read(tmp_path / "per_label.csv")
    assert tuple(header) == PER_LABEL_COLUMNS
    assert kind == ["kind", "cat", "4", "", "", "0.5000", "0.3333", "0.4000"]
    assert tags == ["tags", "red", "2", "0.7500", "0.3000", "1.0000", "0.5000", "0.6667"]
