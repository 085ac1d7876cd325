"""LoRA through the distributed core on a real local Ray (num_cpus=2): a 2-rank ZeRO-2 learner
group training a PEFT adapter, vLLM rollout workers with LoRA enabled receiving only the adapter
on both sync paths (collective gloo broadcast and object store), and whole PPO and SPO runs whose
pi_ref is the policy's own base, computed with the adapter disabled."""

import json

import pytest
import torch

from rayalign.config.schema import PrefConfig, RLConfig
from rayalign.data.tokenize import encode_prompt
from rayalign.distributed.placement import PlacementPlan
from rayalign.learner.group import LearnerGroup
from rayalign.models.checkpoint import load_causal_lm
from rayalign.rollout.worker import RolloutActor
from rayalign.sync.collective import CollectiveSync
from rayalign.sync.object_store import ObjectStoreSync
from tests.conftest import hf_greedy

PROMPTS = ["what colour is the apple ?", "describe the bee .", "where does the crab live ?", "how big is the owl ?"]
GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "n": 1, "seed": 0}
LORA = {"r": 8, "alpha": 16}


def _rl_cfg(demo, out, **over):
    sft0 = str(demo / "sft" / "sft-0")
    cfg = {"policy": sft0, "output": str(out), "steps": 2, "prompts_per_step": 16, "save_every": 0,
           "rollout": {"max_new_tokens": 16, "resources": {"num_cpus": 0.25}},
           "reward": {"resources": {"num_cpus": 0.1}}, "reference": {"resources": {"num_cpus": 0.1}},
           "learner": {"ranks": 2, "resources": {"num_cpus": 0.5},
                       "actor": {"zero_stage": 2, "micro_batch_size": 8, "lr": 1e-2, "lora": LORA},
                       "critic": {"zero_stage": 2, "micro_batch_size": 8, "lr": 1e-4, "lora": LORA}}}
    cfg.update(over)
    return RLConfig.model_validate(cfg)


def test_adapter_only_sync_then_vllm_generates_the_peft_models_tokens(quick_demo, local_ray, tmp_path):
    """After one PPO update of the adapter, both sync paths send the adapter tensors only (no base
    weight), vLLM installs them and its greedy tokens equal the saved adapter's under plain PEFT."""
    from peft import PeftModel

    sft0 = str(quick_demo / "sft" / "sft-0")
    cfg = _rl_cfg(quick_demo, tmp_path / "unused", rollout={"workers": 2, "resources": {"num_cpus": 0.25}})
    plan = PlacementPlan.from_config(cfg)
    plan.reserve(timeout_s=60)
    try:
        learners = LearnerGroup(plan, cfg.learner, sft0, sft0)
        model, tok = load_causal_lm(sft0)
        prompts = [encode_prompt(tok, p) for p in PROMPTS]
        # one PPO update with advantages that push every response token up moves the adapter
        ids = torch.tensor([p + [5, 6, 7, 8] for p in prompts[:1]] * 16)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        old = learners.forward(batch)
        mask = torch.zeros_like(old["logp"])
        mask[:, -4:] = 1
        learners.train({**batch, "response_mask": mask, "old_logp": old["logp"], "old_values": old["values"],
                        "advantages": mask * 3.0, "returns": mask}, {"epochs": 2, "clip": 10.0}, 0)
        learners.save_policy(str(tmp_path / "policy"))
        assert (tmp_path / "policy" / "adapter_model.safetensors").is_file()
        peft = PeftModel.from_pretrained(load_causal_lm(sft0)[0], str(tmp_path / "policy")).eval()
        expected = hf_greedy(peft, tok, prompts)
        assert expected != hf_greedy(model, tok, prompts)  # the adapter changes the policy

        workers = [RolloutActor.options(**plan.options("rollout", i)).remote("vllm", sft0, GREEDY, 0.5, LORA)
                   for i in range(2)]
        import ray

        adapter_bytes = sum(p.numel() * 4 for n, p in peft.named_parameters() if "lora_" in n)
        full_bytes = sum(p.numel() * 4 for p in model.parameters())
        stats = CollectiveSync(learners, workers, bucket_bytes=50_000, backend="gloo").push()
        assert stats.bytes == adapter_bytes and stats.tensors == 2 * 7 * model.config.num_hidden_layers
        assert full_bytes / stats.bytes > 8  # the tiny model: 0.70 MB of weights, 0.08 MB of rank-8 adapter
        for w in workers:
            assert [r["response_ids"] for r in ray.get(w.generate.remote(prompts, GREEDY))] == expected

        fresh = RolloutActor.options(**plan.options("rollout", 0)).remote("vllm", sft0, GREEDY, 0.5, LORA)
        ray.kill(workers[0], no_restart=True)
        stats = ObjectStoreSync([fresh], bucket_bytes=50_000, source=learners).push()
        assert stats.bytes == adapter_bytes
        assert [r["response_ids"] for r in ray.get(fresh.generate.remote(prompts, GREEDY))] == expected
        for a in (workers[1], fresh):
            ray.kill(a, no_restart=True)
        learners.shutdown()
    finally:
        plan.release()


def test_lora_ppo_run_uses_its_base_as_reference_and_saves_an_adapter(quick_demo, local_ray, tmp_path):
    """PPO with a LoRA actor and critic (2 ranks, ZeRO-3, collective sync): no reference worker, pi_ref
    from the adapter-disabled policy (KL exactly 0 before the first update), adapter-sized syncs,
    and a PEFT adapter directory (plus the merged model) at the end."""
    from rayalign.recipes.ppo import run_rl

    out = tmp_path / "ppo"
    lr = {"zero_stage": 3, "micro_batch_size": 8, "lora": {**LORA, "save_merged": True}}
    cfg = _rl_cfg(quick_demo, out, sync={"kind": "collective"},
                  learner={"ranks": 2, "resources": {"num_cpus": 0.5}, "actor": {**lr, "lr": 1e-3},
                           "critic": {**lr, "lr": 1e-4}})
    assert cfg.reference_in_learner
    assert PlacementPlan.from_config(cfg).describe().count("reference") == 0
    policy = run_rl(cfg, "ppo")
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl/sequence"] == 0.0 and rows[1]["kl/sequence"] > 0
    assert "time/reference" not in rows[0]
    model, _ = load_causal_lm(quick_demo / "sft" / "sft-0")
    full_mb = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    assert all(r["sync/mb"] < full_mb / 8 for r in rows)
    cfg_json = json.loads((policy / "adapter_config.json").read_text())
    assert cfg_json["r"] == 8 and cfg_json["base_model_name_or_path"] == str((quick_demo / "sft" / "sft-0").resolve())
    assert (policy / "merged" / "model.safetensors").is_file()
    merged, _ = load_causal_lm(policy / "merged")
    from_adapter, _ = load_causal_lm(policy)
    for (n, a), (_, b) in zip(merged.state_dict().items(), from_adapter.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


@pytest.mark.parametrize("method", ["spo", "dpo"])
def test_lora_preference_runs_with_the_adapter_disabled_reference(method, quick_demo, local_ray, tmp_path):
    """SPO (online samples through vLLM LoRA, global KL) and DPO with a LoRA policy: pi_ref is the
    policy's base with its adapter off, so DPO starts at exactly log 2 and SPO's global KL at 0."""
    from rayalign.recipes.preference import run_preference

    sft0 = str(quick_demo / "sft" / "sft-0")
    out = tmp_path / method
    cfg = PrefConfig.model_validate({
        "policy": sft0, "output": str(out), "data": {"limit": 32}, "pairs_per_step": 16, "save_every": 0,
        "rollout": {"max_new_tokens": 16, "n": 2, "resources": {"num_cpus": 0.25}},
        "learner": {"ranks": 2, "resources": {"num_cpus": 0.5},
                    "actor": {"zero_stage": 2, "micro_batch_size": 8, "lr": 1e-3, "lora": LORA}},
        "algo": {"kl_every": 1, "kl_prompts": 8, "kl_coef": 0.1}, "sync": {"kind": "object_store"}})
    policy = run_preference(cfg, method)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"]["models"] == [sft0]
    if method == "dpo":
        assert rows[0]["preference_loss"] == pytest.approx(0.693147, abs=1e-5)
    else:
        assert rows[0]["global_kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["global_kl"] > 0
        assert rows[-1]["sync/mb"] < 1.0
    assert (policy / "adapter_model.safetensors").is_file() and not (policy / "model.safetensors").exists()


def test_bone_soups_of_lora_backbones(quick_demo, local_ray, tmp_path):
    """`rayalign soups` with a lora block: the Bone Soup backbones are PPO-trained LoRA adapters on
    SFT-0, the front over the preference grid merges them (negative lambda, k chosen on dev), and
    the adapters combine into one exact adapter of twice the rank."""
    from rayalign.config.core import load_config
    from rayalign.config.schema import SoupsConfig
    from rayalign.merge.coefficients import bone_soup_coefficients
    from rayalign.merge.engine import merge_to_disk
    from rayalign.merge.spec import MergeSpec
    from rayalign.recipes.soups import run_soups

    cfg = load_config(SoupsConfig, None, [
        f"policy={quick_demo / 'sft' / 'sft-0'}", f"output={tmp_path / 'soups'}", "methods=[bone]", "lora.r=8",
        "rl=[steps=1,prompts_per_step=16,rollout.n=1,rollout.max_new_tokens=16,learner.actor.lr=1e-3]",
        "grid_points=3", "bone_k=[1.2]", "test.prompts.limit=4", "test.samples_per_prompt=1",
        "test.max_new_tokens=16", "dev.prompts.limit=4", "dev.samples_per_prompt=1", "dev.max_new_tokens=16"])
    result = run_soups(cfg)
    backbones = [tmp_path / "soups" / "runs" / f"backbone-{j}" / "policy" for j in range(2)]
    for b in backbones:
        assert (b / "adapter_config.json").is_file() and not (b / "model.safetensors").exists()
    assert result["methods"]["bone"]["hypervolume"] >= 0 and result["chosen"]["bone_k"] == 1.2
    lam = bone_soup_coefficients([0.9, 0.1], 0.7)
    assert min(lam) < 0
    spec = MergeSpec(method="bone_soup", models=[{"model": str(b)} for b in backbones], mu=[0.9, 0.1], beta=0.7)
    merge_to_disk(spec, tmp_path / "bone-adapter", progress=False)
    assert json.loads((tmp_path / "bone-adapter" / "adapter_config.json").read_text())["r"] == 16
