"""What an eval forward returns: per-image anomaly maps and scores.

Its own module so that `dfr_core.inference` (the one batched forward) and `dfr_core.model` (the
modules it runs) both use it without importing each other in a circle.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AnomalyOutput(NamedTuple):
    """anomaly_map (B, S, S): reconstruction error; score (B,): the image score the image
    threshold applies to (config.image_score, normalised and fused per the config; the max of
    the map for the paper's and for format-1 models); max_score (B,): the max of the map."""

    anomaly_map: torch.Tensor
    score: torch.Tensor
    max_score: torch.Tensor | None = None


def concat_outputs(outs: list[AnomalyOutput]) -> AnomalyOutput:
    """Batches of outputs -> one output on the CPU in float32."""
    return AnomalyOutput(
        torch.cat([o.anomaly_map.float().cpu() for o in outs]),
        torch.cat([o.score.float().cpu() for o in outs]),
        torch.cat([o.max_score.float().cpu() for o in outs]),
    )
