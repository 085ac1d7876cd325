"""On a real local Ray: a vLLM rollout actor, and weight sync through the object store in
buckets. After a sync the actor generates exactly the learner's transformers greedy tokens."""

import ray

from rayalign.data.tokenize import encode_prompt
from rayalign.models.checkpoint import load_causal_lm
from rayalign.rollout.worker import RolloutActor
from rayalign.sync.object_store import ObjectStoreSync
from tests.conftest import hf_greedy

PROMPTS = ["what colour is the apple ?", "describe the bee .", "where does the crab live ?"]


def test_object_store_sync_then_rollout_equals_learner_greedy(quick_demo, local_ray):
    worker = RolloutActor.options(num_cpus=1).remote(
        "vllm", str(quick_demo / "sft" / "sft-0"), {"temperature": 0.0, "max_new_tokens": 12})
    assert ray.get(worker.engine_name.remote()) == "vllm"
    learner_model, tok = load_causal_lm(quick_demo / "base" / "model")  # the learner's current weights
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    before = [r["response_ids"] for r in ray.get(worker.generate.remote(prompts))]

    stats = ObjectStoreSync([worker], bucket_bytes=200_000).push(learner_model.named_parameters())
    assert stats.tensors == len(list(learner_model.parameters())) and 2 <= stats.buckets < stats.tensors
    assert stats.bytes == sum(p.numel() * 4 for p in learner_model.parameters()) and stats.mb_per_s > 0

    expected = hf_greedy(learner_model, tok, prompts)
    assert expected != before
    assert [r["response_ids"] for r in ray.get(worker.generate.remote(prompts))] == expected
    ray.kill(worker)
