"""The distributed core on a real local Ray (num_cpus=2): a 2-rank ZeRO-2 learner group, vLLM
rollout actors, weight sync by collective broadcast (gloo) and through the object store, a
rollout actor killed and brought back, and a whole SALSA run that survives killed actors."""

import json
import time

import numpy as np
import pytest
import ray

from rayalign.config.schema import RLConfig
from rayalign.data.tokenize import encode_prompt
from rayalign.distributed.placement import PlacementPlan
from rayalign.distributed.pool import ActorPool
from rayalign.learner.group import LearnerGroup
from rayalign.models.checkpoint import load_causal_lm
from rayalign.rollout.worker import RolloutActor
from rayalign.sync.collective import CollectiveSync
from rayalign.sync.object_store import ObjectStoreSync
from tests.conftest import hf_greedy

PROMPTS = ["what colour is the apple ?", "describe the bee .", "where does the crab live ?",
           "how big is the owl ?"]
GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "n": 1, "seed": 0}


def _rl_cfg(demo, out, **over):
    cfg = {"policy": str(demo / "sft" / "sft-0"), "output": str(out), "steps": 3, "prompts_per_step": 16,
           "save_every": 0,
           "rollout": {"max_new_tokens": 16, "resources": {"num_cpus": 0.25}},
           "reward": {"resources": {"num_cpus": 0.1}},
           "reference": {"models": [str(demo / "sft" / "sft-0"), str(demo / "sft" / "sft-1")],
                         "resources": {"num_cpus": 0.1}},
           "learner": {"ranks": 2, "resources": {"num_cpus": 0.5},
                       "actor": {"zero_stage": 2, "micro_batch_size": 8, "lr": 1e-4},
                       "critic": {"zero_stage": 2, "micro_batch_size": 8, "lr": 1e-4}}}
    cfg.update(over)
    return RLConfig.model_validate(cfg)


def test_weight_sync_and_rollout_restart(quick_demo, local_ray, tmp_path):
    """The learner group holds the base model, the rollout workers start from SFT-0; after a
    collective (gloo) or object-store sync they generate the learner's transformers greedy tokens,
    also after one of them was killed and restarted."""
    base = quick_demo / "base" / "model"
    cfg = _rl_cfg(quick_demo, tmp_path / "unused", policy=str(base), rollout={"workers": 2,
                  "resources": {"num_cpus": 0.25}})
    plan = PlacementPlan.from_config(cfg)
    plan.reserve(timeout_s=60)
    try:
        learners = LearnerGroup(plan, cfg.learner, str(base), str(base))
        workers = [RolloutActor.options(**plan.options("rollout", i), max_restarts=2)
                   .remote("vllm", str(quick_demo / "sft" / "sft-0"), GREEDY) for i in range(2)]
        model, tok = load_causal_lm(base)
        prompts = [encode_prompt(tok, p) for p in PROMPTS]
        expected = hf_greedy(model, tok, prompts)
        pool = ActorPool("rollout", workers)
        before = [r["response_ids"] for r in pool.map("generate", prompts, GREEDY)]
        assert before != expected

        sync = CollectiveSync(learners, workers, bucket_bytes=100_000, backend="gloo")
        stats = sync.push()
        n_params = len(list(model.parameters()))
        assert stats.tensors == n_params and 2 <= stats.buckets < n_params
        assert stats.bytes == sum(p.numel() * 4 for p in model.parameters())
        assert [r["response_ids"] for r in pool.map("generate", prompts, GREEDY)] == expected

        # kill worker 1 mid-run: Ray restarts it (from SFT-0), the pool re-syncs it and retries
        pool.on_restart = sync.resync
        ray.kill(workers[1], no_restart=False)
        assert [r["response_ids"] for r in pool.map("generate", prompts, GREEDY)] == expected
        assert pool.restarts == 1

        # the object store path, from the learner group, to a fresh worker in worker 0's bundle
        ray.kill(workers[0], no_restart=True)
        fresh = RolloutActor.options(**plan.options("rollout", 0)).remote(
            "vllm", str(quick_demo / "sft" / "sft-0"), GREEDY)
        stats = ObjectStoreSync([fresh], bucket_bytes=100_000, source=learners).push()
        assert stats.tensors == n_params
        assert [r["response_ids"] for r in ray.get(fresh.generate.remote(prompts, GREEDY))] == expected
        for a in (workers[1], fresh):
            ray.kill(a, no_restart=True)
        learners.shutdown()
    finally:
        plan.release()


def test_salsa_run_survives_killed_rollout_and_reward_actors(quick_demo, local_ray, tmp_path):
    """A whole SALSA run (2 learner ranks, ZeRO-2, vLLM, soup reference, gold reward): at
    iteration 1 the rollout and the reward actor are killed; the run restarts them, re-syncs the
    rollout worker and completes every iteration with no step lost."""
    from rayalign.recipes.ppo import run_rl

    killed = []

    def kill_at_first(it, metrics, roles):
        if it == 1:
            ray.kill(roles.rollout.actors[0], no_restart=False)
            ray.kill(roles.reward.actors[0], no_restart=False)
            killed.append(it)

    out = tmp_path / "salsa"
    policy = run_rl(_rl_cfg(quick_demo, out, sync={"kind": "object_store"}), "salsa", on_step=kill_at_first)
    assert killed == [1] and (policy / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["restarts"] == 2 and rows[0]["restarts"] == 0
    for key in ("reward/score", "kl/sequence", "response/length", "policy/entropy", "policy/clip_fraction",
                "value/loss", "time/generate", "time/score", "time/reference", "time/train", "time/sync",
                "sync/seconds", "gold/combined"):
        assert key in rows[-1], key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["engine"] == "vllm" and summary["restarts"] == 2
    assert len(summary["reference"]["models"]) == 2
    assert not (out / "state").exists()


def test_grpo_with_a_soup_reference_trains_the_policy_without_a_critic(quick_demo, local_ray, tmp_path):
    """GRPO (group-normalised advantages) with the KL to a soup of the two SFT seeds as a k3 loss
    term, on 2 learner ranks: no value model is built, trained or saved. The reward stacks the gold
    objectives, a Python function given by file path (imported inside the reward actor; the driver
    never imports it) and a reward service over HTTP on loopback, combined by weights. The learner
    ranks and the reference compute on 2 torch threads each (`resources.cpu_threads`), the reward
    actor on Ray's one thread for its 0.1 CPU."""
    from safetensors.numpy import load_file

    from rayalign.recipes.ppo import run_rl
    from tests.test_reward_sources import RewardService

    sft0 = quick_demo / "sft" / "sft-0"
    out = tmp_path / "grpo"
    fn = tmp_path / "rewards_elsewhere.py"
    fn.write_text("def reward(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n")
    with RewardService() as svc:
        cfg = _rl_cfg(quick_demo, out, steps=2, prompts_per_step=8, rollout={"max_new_tokens": 16, "n": 2},
                      algo={"estimator": "grpo", "beta": 0.1},
                      reference={"models": [str(sft0), str(quick_demo / "sft" / "sft-1")],
                                 "resources": {"num_cpus": 0.1, "cpu_threads": 2}},
                      reward={"kind": ["gold", "function", "http"], "function": str(fn), "http": svc.url,
                              "http_objectives": ["length", "long_prompt"], "weights": [0.6, 0.2, 0.2, -0.01, 0.0, 0.0],
                              "resources": {"num_cpus": 0.1}})
        cfg = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={
            "actor": cfg.learner.actor.model_copy(update={"lr": 1e-3}),
            "resources": cfg.learner.resources.model_copy(update={"cpu_threads": 2})})})
        threads: dict[str, list[int]] = {}

        def torch_threads(it, metrics, roles):
            def get(actors):
                return ray.get([a.__ray_call__.remote(lambda _self: __import__("torch").get_num_threads())
                                for a in actors])
            threads.update(learner=get(roles.learners.ranks), reference=get(roles.reference.actors),
                           reward=get(roles.reward.actors))

        policy = run_rl(cfg, "grpo", on_step=torch_threads)
        assert threads == {"learner": [2, 2], "reference": [2], "reward": [1]}
        assert svc.calls >= 2  # one batch per iteration from the reward actor
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # each source's mean is logged; the score is their weighted sum (mean of a linear map)
        assert r["reward/rewards_elsewhere"] > 0 and r["reward/length"] > 0
        parts = [r[f"reward/{k}"] for k in ("informative", "concise", "friendly", "rewards_elsewhere")]
        assert r["reward/score"] == pytest.approx(float(np.dot(parts, [0.6, 0.2, 0.2, -0.01])), abs=1e-5)
    assert not [k for r in rows for k in r if k.startswith("value/")]  # no critic anywhere
    assert all(np.isfinite(r["policy/kl_loss"]) and r["policy/kl_loss"] >= 0 for r in rows)  # k3 >= 0
    assert abs(rows[0]["kl/sequence"]) > 1e-6  # pi_ref is the soup: with the policy's own start it is 0 at step 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "grpo" and len(summary["reference"]["models"]) == 2
    config = (out / "config.yaml").read_text()
    assert "estimator: grpo" in config and "critic: null" in config
    before, after = load_file(str(sft0 / "model.safetensors")), load_file(str(policy / "model.safetensors"))
    assert any(not np.allclose(before[k], after[k]) for k in before)  # it trained


def test_a_rollout_worker_killed_during_the_collective_sync_is_restarted_and_resynced(quick_demo, local_ray,
                                                                                       tmp_path):
    """sync.kind=collective (gloo) with 2 rollout workers. As iteration 2's sync phase starts, worker
    0 is killed (SIGKILL), so the learner's broadcast runs into a dead member of its group: the
    broadcast fails within the timeout, the run waits for Ray's restart, re-forms the group with the
    new worker and sends again. Every iteration completes, and after that sync both workers
    generate the learner's own greedy tokens."""
    from rayalign.recipes.ppo import run_rl

    killed, checked = [], []

    def kill_at_sync(phase, it, roles):
        if phase == "sync" and it == 1 and not killed:
            ray.kill(roles.rollout.actors[0], no_restart=False)
            killed.append(it)

    def weights_everywhere(it, metrics, roles):
        if it != 2:
            return
        policy = tmp_path / "policy-at-2"
        roles.learners.save_policy(str(policy))
        model, tok = load_causal_lm(policy)
        prompts = [encode_prompt(tok, p) for p in PROMPTS]
        expected = hf_greedy(model, tok, prompts)
        for w in roles.rollout.actors:
            assert [r["response_ids"] for r in ray.get(w.generate.remote(prompts, GREEDY))] == expected
        checked.append(it)

    out = tmp_path / "ppo"
    cfg = _rl_cfg(quick_demo, out, reference={"models": [], "resources": {"num_cpus": 0.1}},
                  sync={"kind": "collective", "timeout_s": 30},
                  rollout={"workers": 2, "max_new_tokens": 16, "resources": {"num_cpus": 0.25}},
                  learner={"ranks": 1, "resources": {"num_cpus": 0.5}, "actor": {"micro_batch_size": 8, "lr": 1e-4},
                           "critic": {"micro_batch_size": 8, "lr": 1e-4}})
    run_rl(cfg, "ppo", on_step=weights_everywhere, on_phase=kill_at_sync)
    assert killed == [1] and checked == [2]
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["sync/recovered"] for r in rows] == [0.0, 1.0, 0.0]  # the failure surfaced in the sync itself
    assert rows[1]["restarts"] == 1 and rows[2]["restarts"] == 1


def test_a_reward_function_that_does_not_import_is_named_before_training(quick_demo, local_ray, tmp_path):
    """The function is imported inside the reward actor; its import error reaches the user as the
    reward actor's start-up error naming the callable, and the run's actors are released."""
    from rayalign.recipes.ppo import run_rl

    cfg = _rl_cfg(quick_demo, tmp_path / "bad", reward={"kind": ["gold", "function"],
                                                         "function": "no_such_module_xyz:score",
                                                         "weights": [0.6, 0.2, 0.2, 1.0],
                                                         "resources": {"num_cpus": 0.1}},
                  rollout={"engine": "hf", "max_new_tokens": 16, "resources": {"num_cpus": 0.25}},
                  learner={"ranks": 1, "resources": {"num_cpus": 0.5}, "actor": {"micro_batch_size": 8},
                           "critic": {"micro_batch_size": 8}})
    with pytest.raises(ValueError, match="reward actor 0 could not start: .*reward function 'no_such_module_xyz:score'"
                                         ": cannot import no_such_module_xyz: ModuleNotFoundError"):
        run_rl(cfg, "ppo")
    assert not (tmp_path / "bad" / "policy").exists()
    deadline = time.monotonic() + 30  # every actor and the plan released (Ray reports resources lazily)
    while ray.available_resources().get("CPU", 0) < 2.0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2.0)
