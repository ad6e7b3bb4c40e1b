"""The numbers behind the QA report (pipeline.report.data) against hand-built Parquet.

Contracts: per-line and per-date counts and rates (errors excluded from the rate denominator, a
zero-anomaly day has rate 0, an errors-only line has no rate), the top-N choice (ok rows only,
score descending, deterministic ties), error reasons (stored or parsed from the message), and
the scope filter.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.report import data as rd

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("product_line", pa.string()),
        pa.field("run_date", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("threshold", pa.float64()),
        pa.field("is_anomaly", pa.bool_()),
        pa.field("defect_area_fraction", pa.float64()),
        pa.field("mask_uri", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ]
)

D1, D2 = "2024-05-01", "2024-05-02"


def _ok(line, date, image_id, score, anomaly, version="v1", threshold=2.0):
    return {
        "image_id": image_id,
        "image_uri": f"s3://archive/{line}/{image_id}.png",
        "product_line": line,
        "run_date": date,
        "score": score,
        "threshold": threshold,
        "is_anomaly": anomaly,
        "defect_area_fraction": 0.1 if anomaly else 0.0,
        "mask_uri": f"s3://out/masks/{image_id}.png" if anomaly else None,
        "model_version": version,
        "run_id": f"run-{date}",
        "status": "ok",
        "error": None,
    }


def _err(line, date, image_id, error):
    return {
        "image_id": image_id,
        "image_uri": f"s3://archive/{line}/{image_id}.png",
        "product_line": line,
        "run_date": date,
        "score": None,
        "threshold": None,
        "is_anomaly": None,
        "defect_area_fraction": None,
        "mask_uri": None,
        "model_version": None,
        "run_id": f"run-{date}",
        "status": "error",
        "error": error,
    }


ROWS = [
    _ok("metal", D1, "m1", 5.0, True),
    _ok("metal", D1, "m2", 3.0, True),
    _ok("metal", D1, "m3", 1.0, False),
    _ok("metal", D1, "m4", 1.0, False),  # tie with m3: image_id breaks it
    _err("metal", D1, "m5", "not_an_image: content is not a recognised image"),
    _ok("metal", D2, "n1", 1.5, False),
    _ok("metal", D2, "n2", 0.5, False, version="v2", threshold=2.5),
    _err("wood", D1, "w1", "no_model: no LATEST under s3://models/wood"),
    _err("wood", D2, "w2", "not_found: s3://archive/wood/w2.png"),
    _err("wood", D2, "w3", "a message without a reason code"),
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """ROWS written to Parquet with an explicit schema, read back as a reader would."""
    path = Path(tmp_path_factory.mktemp("report_data")) / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS, schema=SCHEMA), path)
    frame = pq.read_table(path).to_pandas(types_mapper={pa.bool_(): pd.BooleanDtype()}.get)
    return rd.normalise(frame)


def _by_line(frame: pd.DataFrame) -> dict[str, dict]:
    return {r["product_line"]: r for r in frame.to_dict("records")}


def test_line_summary_counts_and_rates(rows: pd.DataFrame) -> None:
    summary = _by_line(rd.line_summary(rows))
    metal, wood = summary["metal"], summary["wood"]
    assert (metal["rows"], metal["ok"], metal["errors"], metal["anomalies"]) == (7, 6, 1, 2)
    assert metal["anomaly_rate"] == pytest.approx(2 / 6)  # errors excluded from denominator
    assert metal["error_rate"] == pytest.approx(1 / 7)
    assert (metal["first_date"], metal["last_date"], metal["dates"]) == (D1, D2, 2)
    assert metal["model_versions"] == ("v1", "v2")
    assert (wood["rows"], wood["ok"], wood["errors"], wood["anomalies"]) == (3, 0, 3, 0)
    assert math.isnan(wood["anomaly_rate"])  # no rate, not a perfect zero
    assert wood["error_rate"] == 1.0
    assert wood["model_versions"] == ()


def test_daily_rates_zero_anomaly_day_and_errors_only_day(rows: pd.DataFrame) -> None:
    daily = rd.daily_rates(rows).set_index(["product_line", "run_date"])
    assert daily.loc[("metal", D1), "anomaly_rate"] == pytest.approx(2 / 4)
    assert daily.loc[("metal", D2), "anomaly_rate"] == 0.0
    assert daily.loc[("metal", D2), "anomalies"] == 0
    assert math.isnan(daily.loc[("wood", D2), "anomaly_rate"])
    assert daily.loc[("wood", D2), "errors"] == 2
    assert list(daily.index) == [("metal", D1), ("metal", D2), ("wood", D1), ("wood", D2)]


def test_top_n_ok_rows_by_score_with_deterministic_ties(rows: pd.DataFrame) -> None:
    top = rd.top_n(rows, 4)
    assert list(top["image_id"]) == ["m1", "m2", "n1", "m3"]
    assert list(top["rank"]) == [1, 2, 3, 4]
    assert set(top["product_line"]) == {"metal"}  # an errors-only line contributes nothing
    everything = rd.top_n(rows, 100)
    assert list(everything["image_id"]) == ["m1", "m2", "n1", "m3", "m4", "n2"]
    assert rd.top_n(rows, 0).empty
    with pytest.raises(ValueError):
        rd.top_n(rows, -1)


def test_top_n_is_per_line(rows: pd.DataFrame) -> None:
    extra = rd.normalise(
        pd.DataFrame([_ok("glass", D1, f"g{i}", float(i), i > 2) for i in range(5)])
    )
    both = pd.concat([rows, extra], ignore_index=True)
    top = rd.top_n(both, 2)
    assert list(zip(top["product_line"], top["image_id"], strict=True)) == [
        ("glass", "g4"),
        ("glass", "g3"),
        ("metal", "m1"),
        ("metal", "m2"),
    ]


def test_error_rows_and_reasons(rows: pd.DataFrame) -> None:
    errors = rd.error_rows(rows)
    assert list(errors["image_id"]) == ["m5", "w1", "w2", "w3"]
    assert dict(zip(errors["image_id"], errors["reason"], strict=True)) == {
        "m5": "not_an_image",
        "w1": "no_model",
        "w2": "not_found",
        "w3": rd.UNKNOWN_REASON,
    }
    counts = rd.reason_counts(rows)
    assert counts[counts["product_line"] == "wood"]["count"].sum() == 3
    assert rows.loc[rows["status"] == "ok", "reason"].isna().all()


def test_stored_error_reason_column_wins(rows: pd.DataFrame) -> None:
    frame = pd.DataFrame([_err("metal", D1, "x", "decode_error: broken data stream")])
    frame["error_reason"] = ["truncated"]
    assert rd.normalise(frame)["reason"].tolist() == ["truncated"]


def test_error_rows_never_count_as_anomalies() -> None:
    bad = _err("metal", D1, "x", "read_error: boom")
    bad["is_anomaly"] = True  # a writer bug must not inflate the rate
    normal = rd.normalise(pd.DataFrame([bad, _ok("metal", D1, "y", 1.0, False)]))
    summary = _by_line(rd.line_summary(normal))["metal"]
    assert (summary["anomalies"], summary["anomaly_rate"]) == (0, 0.0)


def test_histogram_inputs(rows: pd.DataFrame) -> None:
    np.testing.assert_allclose(np.sort(rd.scores_of(rows, "metal")), [0.5, 1, 1, 1.5, 3, 5])
    assert rd.scores_of(rows, "wood").size == 0
    assert rd.thresholds_of(rows, "metal") == [2.0, 2.5]
    assert rd.thresholds_of(rows, "wood") == []
    assert rd.model_versions(rows) == [("metal", "v1"), ("metal", "v2")]


def test_filter_by_date_range_and_products(rows: pd.DataFrame) -> None:
    one_day = rd.filter_rows(rows, rd.RowFilter(run_date=D2))
    assert set(one_day["run_date"]) == {D2}
    assert len(one_day) == 4
    ranged = rd.filter_rows(rows, rd.RowFilter(date_from=D1, date_to=D1, products=("wood",)))
    assert list(ranged["image_id"]) == ["w1"]
    open_ended = rd.filter_rows(rows, rd.RowFilter(date_from=D2))
    assert set(open_ended["run_date"]) == {D2}
    assert rd.filter_rows(rows, rd.RowFilter(products=("nope",))).empty


def test_empty_rows_give_empty_tables(rows: pd.DataFrame) -> None:
    empty = rows.iloc[0:0]
    assert rd.line_summary(empty).empty
    assert rd.daily_rates(empty).empty
    assert rd.top_n(empty, 5).empty
    assert rd.error_rows(empty).empty
    assert rd.reason_counts(empty).empty


@pytest.mark.parametrize(
    "kwargs",
    [
        {"run_date": D1, "date_from": D1},
        {"run_date": "2024-5-1"},
        {"date_from": "2024-02-30"},
        {"date_from": D2, "date_to": D1},
    ],
)
def test_row_filter_rejects_bad_scopes(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        rd.RowFilter(**kwargs)


def test_normalise_requires_core_columns() -> None:
    with pytest.raises(ValueError, match="status"):
        rd.normalise(pd.DataFrame({"image_id": ["a"], "product_line": ["p"], "run_date": [D1]}))
