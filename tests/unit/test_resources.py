"""Resource sizing of the scoring job from the cluster's shape (no Ray needed)."""

from __future__ import annotations

import pytest

from pipeline.resources import ClusterShape, ResourceRequest, plan_resources

MP = 64_000_000


def test_two_cpus_two_single_threaded_actors_and_a_separate_decode_share():
    plan = plan_resources(ResourceRequest(), ClusterShape((2.0,), (0.0,)), MP)
    assert (plan.min_actors, plan.max_actors, plan.cpus_per_actor) == (2, 2, 0.875)
    assert plan.gpus_per_actor == 0 and plan.torch_threads == 1
    # a decode task always fits beside the actors
    assert plan.cpus_per_actor * 2 + plan.decode_cpus <= 2.0
    assert plan.decode_cpus != plan.cpus_per_actor and plan.decode_memory > 0


def test_node_memory_caps_the_actors_and_their_threads_share_the_cpus():
    small = ClusterShape((2.0,), (0.0,), (2.0 * 2**30,))  # room for one actor only
    plan = plan_resources(ResourceRequest(), small, MP)
    assert (plan.max_actors, plan.cpus_per_actor, plan.torch_threads) == (1, 1.75, 2)
    roomy = ClusterShape((2.0,), (0.0,), (16.0 * 2**30,))
    assert plan_resources(ResourceRequest(), roomy, MP).max_actors == 2


def test_big_cpu_nodes_get_one_actor_per_cpu_within_their_memory():
    plan = plan_resources(ResourceRequest(), ClusterShape((32.0, 32.0), (0.0, 0.0)), MP)
    assert plan.max_actors == 56 and plan.torch_threads == 1  # 28 per node: 32 less 4 reserved
    assert plan.cpus_per_actor * 28 + plan.decode_cpus <= 32
    capped = ClusterShape((32.0, 32.0), (0.0, 0.0), (15.0 * 2**30, 15.0 * 2**30))
    plan = plan_resources(ResourceRequest(), capped, MP)
    assert plan.max_actors == 20 and plan.torch_threads == 3  # 10 per node share its 32 CPUs
    assert plan.cpus_per_actor * 10 + plan.decode_cpus <= 32


def test_gpus_one_actor_per_gpu_and_nodes_without_gpus_do_not_count():
    plan = plan_resources(ResourceRequest(), ClusterShape((8.0, 8.0, 4.0), (1.0, 2.0, 0.0)), MP)
    assert (plan.max_actors, plan.gpus_per_actor, plan.cpus_per_actor) == (3, 1.0, 1.0)
    assert plan.torch_threads == 1


@pytest.mark.parametrize(
    "request_, expect",
    [
        (ResourceRequest(min_actors=1, max_actors=3), {"min_actors": 1, "max_actors": 3}),
        (ResourceRequest(cpus_per_actor=0.5, decode_cpus=0.5), {"cpus_per_actor": 0.5}),
        (ResourceRequest(gpus_per_actor=0.0), {"gpus_per_actor": 0.0}),
        (ResourceRequest(torch_threads=3), {"torch_threads": 3}),
    ],
)
def test_given_figures_are_kept(request_, expect):
    plan = plan_resources(request_, ClusterShape((4.0,), (1.0,)), MP)
    for name, value in expect.items():
        assert getattr(plan, name) == value


@pytest.mark.parametrize(
    ("pool", "blocks", "expect"),
    [((3, 3), 1, (1, 1)), ((2, 4), 3, (2, 3)), ((1, 8), 100, (1, 8)), ((2, 2), 0, (1, 1))],
)
def test_the_actor_pool_never_exceeds_the_waves_inputs(pool, blocks, expect):
    """More actors than inputs cannot be used, and Ray Data warns on every such (small) run."""
    from pipeline.score_graph import _actor_pool

    plan = plan_resources(
        ResourceRequest(min_actors=pool[0], max_actors=pool[1]), ClusterShape((32.0,), (0.0,)), MP
    )
    sizes = _actor_pool(lambda min_size, max_size: (min_size, max_size), plan, blocks)
    assert sizes == expect


def test_small_blocks_arrive_bundled_up_to_the_batch_size():
    import pyarrow as pa

    from pipeline.score_graph import _bundles

    blocks = [pa.table({"x": list(range(5))}), pa.table({"x": list(range(5))})]
    assert _bundles(blocks, 16) == 1  # the demo: two lines of 5 images, one bundle of 10
    assert _bundles(blocks, 4) == 2  # never more than the blocks
    one, eight = pa.table({"x": [0]}), pa.table({"x": list(range(8))})
    assert _bundles([one, eight], 4) == 1  # the one-row block joins the next: one bundle of 9
    assert _bundles([eight, one], 4) == 1  # the short tail may reach the actors first and join
    assert _bundles([eight, one, eight], 4) == 2
    assert _bundles([pa.table({"x": list(range(100))})] * 8, 32) == 8
    assert _bundles([], 32) == 1
