"""The drift tests of a run read a bounded, uniform sample of its ok rows, with exact counts."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.drift import SCORE_COLUMN
from pipeline.drift_io import _read_rows
from pipeline.input_stats import STAT_NAMES


def _files(root, n_files: int = 6, per_file: int = 10) -> list[str]:
    names = []
    for f in range(n_files):
        ids = [f"img-{f}-{i}" for i in range(per_file)]
        status = ["error" if i % 4 == 3 else "ok" for i in range(per_file)]
        table = pa.table(
            {
                "image_id": ids,
                "status": status,
                SCORE_COLUMN: [float(f * per_file + i) for i in range(per_file)],
                "is_anomaly": [i % 3 == 0 for i in range(per_file)],
                **{name: [0.5] * per_file for name in STAT_NAMES},
            }
        )
        names.append(f"scores/part-{f}.parquet")
        (root / "scores").mkdir(exist_ok=True)
        pq.write_table(table, root / names[-1])
    return names


def test_all_ok_rows_below_the_limit(tmp_path):
    files = _files(tmp_path)
    rows, (n_ok, n_anom) = _read_rows(str(tmp_path), files, None)
    ok_per_file = sum(1 for i in range(10) if i % 4 != 3)
    assert n_ok == len(rows[SCORE_COLUMN]) == 6 * ok_per_file
    assert n_anom == 6 * sum(1 for i in range(10) if i % 4 != 3 and i % 3 == 0)
    assert set(rows["status"]) == {"ok"}


def test_a_bounded_deterministic_sample_beyond_it(tmp_path):
    files = _files(tmp_path)
    full, totals = _read_rows(str(tmp_path), files, None)
    one, totals_one = _read_rows(str(tmp_path), files, None, limit=7)
    two, _ = _read_rows(str(tmp_path), list(reversed(files)), None, limit=7)
    assert totals_one == totals  # the counts are of every row, not of the sample
    assert len(one[SCORE_COLUMN]) == 7
    assert sorted(one[SCORE_COLUMN]) == sorted(two[SCORE_COLUMN])  # whatever the file order
    assert set(one[SCORE_COLUMN]) <= set(full[SCORE_COLUMN])


def test_no_files(tmp_path):
    rows, totals = _read_rows(str(tmp_path), [], None)
    assert totals == (0, 0) and rows[SCORE_COLUMN] == []
