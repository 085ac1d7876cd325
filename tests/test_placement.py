"""The placement plan: bundles from the config, colocation, the fit check on node lists, and on a
real multi-node Ray cluster with declared GPUs (ray.cluster_utils.Cluster, fake nodes)."""

import pytest

from rayalign.config.schema import RLConfig
from rayalign.distributed.placement import PlacementError, PlacementPlan, RoleDemand


def _cfg(**over):
    base = {"policy": "p", "output": "o", "prompts_per_step": 64}
    base.update(over)
    return RLConfig.model_validate(base)


def test_bundles_follow_the_config_and_colocation():
    cfg = _cfg(learner={"ranks": 2, "resources": {"num_cpus": 1, "num_gpus": 1}},
               reference={"workers": 2, "resources": {"num_cpus": 1, "num_gpus": 0.25}},
               rollout={"workers": 3, "resources": {"num_cpus": 2, "num_gpus": 1}},
               placement={"colocate": [["learner", "reference"]]})
    plan = PlacementPlan.from_config(cfg)
    # learner i and reference i share bundle i; 3 rollout bundles; 1 reward bundle
    assert plan.bundles[:2] == [{"CPU": 2, "GPU": 1.25}] * 2
    assert plan.where[("learner", 1)] == plan.where[("reference", 1)] == 1
    assert plan.bundles[2:5] == [{"CPU": 2, "GPU": 1}] * 3 and plan.bundles[5] == {"CPU": 0.25}
    assert plan.totals() == {"CPU": 10.25, "GPU": 5.5}  # 2*2 + 3*2 + 0.25
    text = plan.describe()
    assert "learner[1]" in text and "reference[1]" in text and "6 bundles" in text


def test_cpu_threads_reach_the_plan_and_a_bad_count_is_refused():
    """`resources.cpu_threads` reaches the role's demand (its actors' OMP_NUM_THREADS: checked on a
    real Ray in test_rl_on_ray's GRPO run); unset, Ray's rule applies."""
    plan = PlacementPlan.from_config(_cfg(learner={"resources": {"num_cpus": 0.5, "cpu_threads": 4}}))
    assert plan.demands["learner"].cpu_threads == 4 and plan.demands["reference"].cpu_threads is None
    text = plan.describe()
    assert "learner[0] (CPU=0.5, 4 threads)" in text and "reference[0] (CPU=0.25)" in text
    with pytest.raises(ValueError, match="cpu_threads"):
        _cfg(learner={"resources": {"cpu_threads": 0}})


def test_check_places_bundles_or_names_what_is_missing():
    plan = PlacementPlan.build([RoleDemand("learner", 8, 4, 1), RoleDemand("rollout", 4, 4, 1)])
    two_nodes = [{"CPU": 32, "GPU": 8}, {"CPU": 32, "GPU": 8}]
    homes = plan.check(two_nodes)
    assert sorted(homes).count(0) == 8 and sorted(homes).count(1) == 4  # first-fit packs node 0
    with pytest.raises(PlacementError, match=r"GPU: needs 12, cluster has 8"):
        plan.check([{"CPU": 64, "GPU": 8}])
    big = PlacementPlan.build([RoleDemand("learner", 1, 1, 16)])
    with pytest.raises(PlacementError, match=r"bundle 0 \(learner 0\) needs CPU=1 GPU=16.*largest node has"):
        big.check(two_nodes)
    strict = PlacementPlan.build([RoleDemand("learner", 2, 1, 8)], strategy="STRICT_PACK")
    with pytest.raises(PlacementError, match="STRICT_PACK needs one node"):
        strict.check(two_nodes)
    spread = PlacementPlan.build([RoleDemand("rollout", 3, 1, 1)], strategy="STRICT_SPREAD")
    with pytest.raises(PlacementError, match="node of its own"):
        spread.check(two_nodes)
    # fragmentation: the totals fit, the bundles do not
    frag = PlacementPlan.build([RoleDemand("learner", 3, 1, 5)])  # 15 of 16 GPUs, but 5+5 > 8
    with pytest.raises(PlacementError, match="cannot be placed"):
        frag.check(two_nodes)


def test_bad_plans_are_refused_with_the_role_named():
    with pytest.raises(PlacementError, match="asks for no CPU and no GPU"):
        PlacementPlan.build([RoleDemand("reward", 1, 0, 0)])
    with pytest.raises(PlacementError, match=r"colocate names role\(s\) \['critic'\]"):
        PlacementPlan.build([RoleDemand("learner", 1, 1, 0)], colocate=[["learner", "critic"]])
    with pytest.raises(ValueError, match="not a multiple of learner.actor"):
        _cfg(prompts_per_step=30, learner={"ranks": 2})


def test_plan_on_a_fake_multi_node_gpu_cluster():
    """Two fake 8-GPU nodes: a 12-GPU SALSA plan is reserved for real, a 20-GPU one is refused
    before any actor starts."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 8})
    cluster.add_node(num_cpus=4, num_gpus=8)
    ray.init(address=cluster.address)
    try:
        cluster.wait_for_nodes()
        cfg = _cfg(prompts_per_step=128, learner={"ranks": 8, "resources": {"num_cpus": 0.25, "num_gpus": 1}},
                   reference={"workers": 8, "resources": {"num_cpus": 0.1, "num_gpus": 0}},
                   rollout={"workers": 4, "resources": {"num_cpus": 0.5, "num_gpus": 1}},
                   placement={"colocate": [["learner", "reference"]], "timeout_s": 30})
        plan = PlacementPlan.from_config(cfg)
        plan.reserve(timeout_s=30)
        table = ray.util.placement_group_table(plan.pg)
        assert table["state"] == "CREATED" and len(set(table["bundles_to_node_id"].values())) == 2

        @ray.remote
        def gpus() -> list[int]:
            return ray.get_gpu_ids()

        opts = plan.options("rollout", 3)
        assert opts["num_gpus"] == 1 and len(ray.get(gpus.options(**opts).remote())) == 1
        plan.release()
        too_big = PlacementPlan.from_config(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(
            update={"workers": 12})}))
        with pytest.raises(PlacementError, match="GPU: needs 20, cluster has 16"):
            too_big.reserve(timeout_s=5)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_train_workers_plan_from_the_scaling_config():
    """train.workers / resources_per_worker / use_gpu / placement_strategy become the workers' bundles,
    checked on node lists like any plan; bad scaling values are named at config load."""
    from pydantic import ValidationError

    from rayalign.config.schema import TrainScaling
    from rayalign.distributed.train import worker_plan

    gpu_nodes = [{"CPU": 96, "GPU": 8}] * 2
    plan = worker_plan(TrainScaling(workers=16, use_gpu=True, resources_per_worker={"CPU": 10, "GPU": 1}), True)
    assert plan.bundles == [{"CPU": 10, "GPU": 1}] * 16 and sorted(set(plan.check(gpu_nodes))) == [0, 1]
    assert worker_plan(TrainScaling(workers=2), use_gpu=True).bundles == [{"CPU": 1, "GPU": 1}] * 2
    assert worker_plan(TrainScaling(workers=2), use_gpu=False).bundles == [{"CPU": 1}] * 2
    with pytest.raises(PlacementError, match="GPU: needs 17, cluster has 16"):
        worker_plan(TrainScaling(workers=17, use_gpu=True), True).check(gpu_nodes)
    spread = worker_plan(TrainScaling(workers=3, placement_strategy="STRICT_SPREAD"), False)
    with pytest.raises(PlacementError, match="STRICT_SPREAD"):
        spread.check([{"CPU": 4}] * 2)
    assert not TrainScaling().enabled and TrainScaling(workers=2).enabled and TrainScaling(ray=True).enabled
    with pytest.raises(ValidationError, match="'CPU' and 'GPU'"):
        TrainScaling(resources_per_worker={"gpu": 1})
    with pytest.raises(ValidationError, match="must be >= 0"):
        TrainScaling(resources_per_worker={"CPU": -1})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        TrainScaling(workers=0)
