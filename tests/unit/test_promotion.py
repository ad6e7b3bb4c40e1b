"""The promotion gate's comparison, its records, and the manual override on a local registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import promotion, registry
from pipeline.cli.models import describe, why_latest
from pipeline.promotion import Basis, GateResult, compare

GOOD = {"image_auroc": 0.95, "pixel_auroc": 0.97, "pro": 0.90, "tpr_at_1pct_fpr": 0.6,
        "realised_image_fpr": 0.02, "realised_image_recall": 0.8}  # fmt: skip


def test_a_weak_candidate_is_held_a_comparable_one_promoted() -> None:
    weak = {**GOOD, "image_auroc": 0.70, "pro": 0.5}
    held = compare(weak, GOOD, "v1", tolerance=0.02)
    assert not held.promote and held.basis == Basis.GATE
    assert "image_auroc 0.7000 < 0.9500" in held.reason and "pro" in held.reason
    assert held.comparison["image_auroc"]["delta"] == pytest.approx(-0.25)
    slightly = {**GOOD, "image_auroc": 0.94, "realised_image_recall": 0.1}  # recall not gated
    assert compare(slightly, GOOD, "v1", tolerance=0.02).promote
    assert GateResult.from_dict(held.to_dict()) == held


def test_only_metrics_both_versions_have_are_gated() -> None:
    image_only = {"image_auroc": 0.96, "pixel_auroc": None, "pro": None}
    result = compare(image_only, GOOD, "v1")
    assert result.promote and result.reason.endswith("on image_auroc")
    assert compare({}, GOOD, "v1").basis == Basis.NO_EVALUATION_SET


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, make_artifact) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact"))


def test_held_versions_are_published_not_latest_and_promote_overrides(artifact, models_uri):
    models = models_uri
    first = GateResult(True, Basis.FIRST_VERSION, "promoted: first version of the line")
    promotion.write_decision(models, "metal", "v1", first)
    registry.publish(artifact, models, "metal", version="v1")
    held = compare({**GOOD, "image_auroc": 0.5}, GOOD, "v1")
    promotion.write_decision(models, "metal", "v2", held)
    registry.publish(artifact, models, "metal", version="v2", promote=held.promote)
    assert registry.list_versions(models, "metal") == ["v1", "v2"]
    assert registry.latest_version(models, "metal") == "v1"
    rows = describe(models)
    assert [r["decision"] for r in rows] == ["promoted (first_version)", "held (gate)"]
    assert "newer versions held back: v2" in why_latest(models, rows)["metal"]

    result = promotion.promote(models, "metal", "v2", reason="QA accepts the trade-off")
    assert result.basis == Basis.MANUAL and registry.latest_version(models, "metal") == "v2"
    why = why_latest(models, describe(models))["metal"]
    assert why.startswith("v2: promoted by hand over v1: QA accepts")
    with pytest.raises(ValueError, match="no complete version 'v9'"):
        promotion.promote(models, "metal", "v9")
    assert registry.latest_version(models, "metal") == "v2"


def test_held_back_follows_the_decisions_order_not_the_version_names(artifact, models_uri):
    """Versions published in one second differ only in their random suffixes: "-46df87" sorts
    before "-e9e566" whichever came first, so a held version may sort before LATEST."""
    models, line = models_uri, "glass"
    good, weak, older = (
        "20261205T015022Z-e9e566",
        "20261205T015022Z-46df87",
        "20261205T015021Z-aaaaaa",
    )
    held = compare({**GOOD, "image_auroc": 0.5}, GOOD, good)
    promotion.write_decision(models, line, older, held)  # held before LATEST was made
    first = GateResult(True, Basis.FIRST_VERSION, "promoted: first version of the line")
    promotion.write_decision(models, line, good, first)
    registry.publish(artifact, models, line, version=good)
    promotion.write_decision(models, line, weak, held)
    registry.publish(artifact, models, line, version=weak, promote=False)
    assert registry.latest_version(models, line) == good
    why = why_latest(models, describe(models))[line]
    assert why.endswith(f"newer versions held back: {weak}")
