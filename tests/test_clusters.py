"""clusters/: every file is parsed and checked for what its tool needs -- the cluster-launcher
YAMLs by Ray's own validator, runtime_envs by RuntimeEnv, every job of the 7B recipes by the same
config loaders the CLI uses, the KubeRay manifests against the recipes they run -- and each 7B
resource plan is checked against the clusters' GPU nodes, then reserved on a fake 2-node Ray
cluster with 8 GPUs per node. (The quick demo itself runs through `ray start --head` and
`ray job submit` in the session fixture of conftest.py.)"""

from __future__ import annotations

import copy
import importlib
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from rayalign.config.core import load_config
from rayalign.config.schema import EvalConfig, RLConfig, RMConfig, ServeConfig, SFTConfig
from rayalign.distributed.placement import PlacementPlan
from rayalign.merge.spec import load_spec
from tests.conftest import RAY_BIN, ROOT

C = ROOT / "clusters"
RECIPES = ["salsa-7b", "bone-soup-7b"]
SCHEMAS = {"sft": SFTConfig, "rm": RMConfig, "train": RLConfig, "eval": EvalConfig, "serve": ServeConfig}


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def recipe_jobs(recipe: str) -> dict[str, tuple[list[str], list[str]]]:
    """submission id -> (ray job submit options, entrypoint argv), from the script's DRY_RUN."""
    out = subprocess.run(["bash", str(C / "recipes" / recipe / "submit.sh")], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "DRY_RUN": "1"}).stdout
    jobs = {}
    for line in out.strip().splitlines():
        argv = shlex.split(line)
        cut = argv.index("--")
        jobs[argv[0]] = (argv[1:cut], argv[cut + 1:])
    return jobs


def rayalign_args(entry: list[str]) -> list[str]:
    """The argv after `python -m rayalign.cli` / `torchrun ... -m rayalign.cli`."""
    i = entry.index("-m")
    assert entry[i + 1] == "rayalign.cli", entry
    return entry[i + 2:]


def command_config(args: list[str]):
    """Load a recipe command's config exactly as the CLI would (config file + dotted overrides)."""
    cmd = args[0]
    if cmd == "merge":
        spec, _out, *rest = args[1:]
        return load_spec(ROOT / spec, [a for a in rest if not a.startswith("--")])
    if cmd == "train":
        args = args[1:]
    rest = args[1:]
    config = None
    if "--config" in rest:
        k = rest.index("--config")
        config, rest = ROOT / rest[k + 1], rest[:k] + rest[k + 2:]
        assert config.is_file(), config
    return load_config(SCHEMAS[cmd], config, rest)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_job_is_a_valid_rayalign_command(recipe):
    jobs = recipe_jobs(recipe)
    assert len(jobs) >= 5
    submit_help = subprocess.run([str(RAY_BIN), "job", "submit", "--help"], capture_output=True, text=True, check=True).stdout
    seen = set()
    for sid, (opts, entry) in jobs.items():
        for o in opts:
            if o.startswith("--"):
                assert o in submit_help, f"{sid}: ray job submit has no option {o}"
        args = rayalign_args(entry)
        seen.add(args[0])
        assert entry[0] == "python", f"{sid}: every stage is a rayalign driver (no torchrun)"
        if args[0] == "convert":
            assert args[1] == "pku-saferlhf", sid
            continue
        cfg = command_config(args)
        if args[:2] == ["train", "salsa"]:
            assert len(cfg.reference.models) >= 2, f"{sid}: SALSA needs a soup of SFT models"
        if args[0] == "train":
            assert cfg.rollout.engine == "vllm" and cfg.sync.kind == "collective" and cfg.learner.actor.zero_stage == 3
        if args[0] in ("sft", "rm"):  # Ray Train workers take the GPUs, the driver none
            assert cfg.train.workers == 16 and cfg.train.use_gpu and "--entrypoint-num-gpus" not in opts, sid
            assert cfg.train.max_failures > 0 and cfg.learner.zero_stage == 3, sid
    assert {"train", "eval"} <= seen


def _gpu_nodes() -> dict[str, list[dict[str, float]]]:
    """Each cluster's GPU worker nodes at their 7B-recipe size (2 nodes of 8 GPUs)."""
    out = {}
    for f in sorted((C / "launcher").glob("*.yaml")):
        types = _yaml(f)["available_node_types"]
        gpu = next(t for t in types.values() if t["resources"].get("GPU"))
        out[f.name] = [{"CPU": gpu["resources"]["CPU"], "GPU": gpu["resources"]["GPU"]}] * 2
    group = _yaml(C / "kuberay" / "raycluster-gpu.yaml")["spec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    out["kuberay"] = [{"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}] * group["replicas"]
    return out


def _rl_configs() -> dict[str, RLConfig]:
    return {sid: command_config(rayalign_args(entry)) for recipe in RECIPES
            for sid, (_, entry) in recipe_jobs(recipe).items() if rayalign_args(entry)[0] == "train"}


def test_7b_resource_plans_fit_every_cluster():
    configs = _rl_configs()
    assert {"salsa-7b-ppo", "salsa-7b-salsa", "bone-7b-backbone-0", "bone-7b-backbone-1"} <= set(configs)
    for cluster, nodes in _gpu_nodes().items():
        for sid, cfg in configs.items():
            plan = PlacementPlan.from_config(cfg)
            assert plan.totals()["GPU"] == 16, f"{sid}: the documented plan is 16 GPUs"
            homes = plan.check(nodes)  # raises PlacementError naming the bundle that does not fit
            assert sorted(set(homes)) == [0, 1], f"{sid} on {cluster}: expected both 8-GPU nodes in use"


def _supervised_configs() -> dict:
    return {sid: command_config(rayalign_args(entry)) for recipe in RECIPES
            for sid, (_, entry) in recipe_jobs(recipe).items() if rayalign_args(entry)[0] in ("sft", "rm")}


def test_7b_supervised_workers_fit_every_cluster_over_both_gpu_nodes():
    from rayalign.distributed.train import worker_plan

    configs = _supervised_configs()
    assert {"salsa-7b-sft", "salsa-7b-rm", "bone-7b-rm-helpful", "bone-7b-rm-harmless"} <= set(configs)
    for cluster, nodes in _gpu_nodes().items():
        for sid, cfg in configs.items():
            plan = worker_plan(cfg.train, use_gpu=True)
            assert plan.totals()["GPU"] == 16, sid
            homes = plan.check(nodes)
            assert sorted(set(homes)) == [0, 1], f"{sid} on {cluster}: expected both 8-GPU nodes in use"
            # the global batch of the recipe: micro x accumulation x workers
            per_step = cfg.learner.micro_batch_size * cfg.learner.grad_accum * cfg.train.workers
            assert per_step in (64, 128), sid


def test_salsa_7b_plan_is_reserved_on_a_fake_two_node_gpu_cluster():
    import ray
    from ray.cluster_utils import Cluster

    nodes = _gpu_nodes()["kuberay"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "num_gpus": 0})
    for n in nodes:
        cluster.add_node(num_cpus=int(n["CPU"]), num_gpus=int(n["GPU"]))
    ray.init(address=cluster.address)
    try:
        cluster.wait_for_nodes()
        plan = PlacementPlan.from_config(_rl_configs()["salsa-7b-salsa"])
        plan.reserve(timeout_s=60)
        table = ray.util.placement_group_table(plan.pg)
        assert table["state"] == "CREATED" and len(table["bundles_to_node_id"]) == 16
        assert len(set(table["bundles_to_node_id"].values())) == 2  # both GPU nodes, never the CPU head

        @ray.remote
        def gpu_ids() -> list[int]:
            return ray.get_gpu_ids()

        for role in ("learner", "rollout", "reference", "reward"):
            assert len(ray.get(gpu_ids.options(**plan.options(role, 0)).remote())) == 1, role
        plan.release()
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cluster_launcher_yamls_pass_ray_up_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _yaml(C / "launcher" / name)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs first
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and gpu[0]["resources"]["GPU"] == 8 and gpu[0]["max_workers"] >= 2
    assert "rayalign" in cfg["docker"]["image"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("/mnt/shared" in c for c in cfg["initialization_commands"])
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["head"]["resourcez"] = {}
    with pytest.raises(Exception, match="resourcez"):
        validate_config(prepare_config(broken))


def test_runtime_envs_are_valid():
    from ray.runtime_env import RuntimeEnv

    gpu = RuntimeEnv(**_yaml(C / "runtime_env" / "gpu.yaml"))
    assert gpu["working_dir"] == "." and ".venv" in gpu["excludes"]
    laptop = RuntimeEnv(**_yaml(C / "runtime_env" / "laptop.yaml"))
    assert laptop["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_kuberay_rayjobs_run_the_recipe_on_the_raycluster():
    raycluster = _yaml(C / "kuberay" / "raycluster-gpu.yaml")
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    worker = raycluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {"mountPath": "/mnt/shared", "name": "shared"} in worker["containers"][0]["volumeMounts"]
    jobs = list(yaml.safe_load_all((C / "kuberay" / "rayjob-salsa-7b.yaml").read_text()))
    recipe = recipe_jobs("salsa-7b")
    assert [j["metadata"]["name"] for j in jobs] == list(recipe)  # every stage, in order
    for job in jobs:
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
        spec = job["spec"]
        opts, entry = recipe[job["metadata"]["name"]]
        assert shlex.split(spec["entrypoint"]) == entry  # the same command as submit.sh
        gpus = opts[opts.index("--entrypoint-num-gpus") + 1] if "--entrypoint-num-gpus" in opts else None
        assert spec.get("entrypointNumGpus") == (int(gpus) if gpus else None)
        assert spec["clusterSelector"]["ray.io/cluster"] == raycluster["metadata"]["name"]
        assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/opt/rayalign"


@pytest.mark.parametrize("source", ["kuberay/rayservice.yaml", "serve/serve-config.yaml"])
def test_serve_configs_build_the_rayalign_app(source):
    doc = _yaml(C / source)
    if source.startswith("kuberay"):
        assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
        workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        assert any(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for w in workers)
        doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(doc)  # what `serve deploy` and KubeRay's RayService check
    app = doc["applications"][0]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    names = {d["name"] for d in app["deployments"]}
    assert names == {"ModelServer", "Ingress"}
    from rayalign.serve import app as serve_app

    assert all(hasattr(serve_app, n) for n in names)
    config = app["args"]["config"]
    if config.startswith("/opt/rayalign/"):  # the image's copy of this checkout
        cfg = load_config(ServeConfig, ROOT / config.removeprefix("/opt/rayalign/"), app["args"]["overrides"])
        assert cfg.families[0].kind == "bone_soup" and cfg.replica_gpus == 1 and cfg.engine == "vllm"


def test_dockerfile_copies_what_exists():
    text = (C / "docker" / "Dockerfile").read_text()
    copied = [line.split()[-2] for line in text.splitlines() if line.startswith("COPY")]
    sources = [s for line in text.splitlines() if line.startswith("COPY") for s in line.split()[2:-1]]
    assert copied and all((ROOT / s).exists() for s in sources), sources
    assert '"/opt/rayalign[gpu]"' in text
