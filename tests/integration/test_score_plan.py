"""Ray Data must not fuse decoding into the scoring actors: checked on the built plan.

Ray fuses adjacent map stages with compatible remote args; with equal CPU figures (the old
defaults) decoding ran inside the model actor. The plan is built, not executed.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.io_stages import DecodeConfig, ReadConfig
from pipeline.resources import ClusterShape, ResourceRequest, plan_resources
from pipeline.score_graph import build_dataset, physical_plan
from pipeline.score_stages import ScoringConfig

pytestmark = pytest.mark.timeout(600)

SCORING = ScoringConfig(
    models_uri="/nonexistent", models={}, cache_dir="/tmp", options=None, output_uri="/tmp/o",
    run_date="2024-01-01", run_id="r", masks="none", heatmaps=False, torch_threads=None,
    write_threads=1,
)  # fmt: skip


@pytest.mark.parametrize(
    "request_",
    [
        ResourceRequest(),  # the defaults, sized from the local 2-CPU cluster
        ResourceRequest(cpus_per_actor=0.5, decode_cpus=0.5),  # equal CPU figures
        ResourceRequest(cpus_per_actor=1.0, decode_cpus=1.0, min_actors=1, max_actors=1),
    ],
)
def test_decode_is_not_fused_into_the_scoring_actor(ray_session, request_):
    plan = plan_resources(request_, ClusterShape.from_ray(), 64_000_000)
    blocks = [pa.table({"image_uri": ["a"], "product_line": ["p"]})]
    read, decode = ReadConfig(None, 2, 10), DecodeConfig({"p": 64}, 10)
    text = physical_plan(build_dataset(blocks, read, decode, SCORING, plan, 8))
    assert "ActorPoolMapOperator[MapBatches(ScoringActor)]" in text, text
    assert "TaskPoolMapOperator[MapBatches(read_batch)->MapBatches(decode_batch)]" in text, text


def test_control_equal_remote_args_do_fuse(ray_session):
    """Without the decode stage's own memory reservation Ray fuses it into the actor: the
    check above can see fusion when it happens."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.io_stages import decode_batch
    from pipeline.score_stages import ScoringActor

    ds = ray.data.from_arrow([pa.table({"image_uri": ["a"], "product_line": ["p"]})])
    ds = ds.map_batches(decode_batch, fn_kwargs={"config": None}, num_cpus=1)
    ds = ds.map_batches(
        ScoringActor, fn_constructor_kwargs={"config": SCORING}, num_cpus=1,
        compute=ActorPoolStrategy(min_size=1, max_size=1),
    )  # fmt: skip
    assert "MapBatches(decode_batch)->MapBatches(ScoringActor)" in physical_plan(ds)
