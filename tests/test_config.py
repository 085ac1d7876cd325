"""Configs: YAML + dotted overrides; unknown keys and bad values name the key and what is allowed."""

import pytest

from rayalign.config.core import ConfigError, apply_overrides, dump_config, load_config
from rayalign.config.schema import LearnerConfig, SFTConfig


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "sft.yaml"
    f.write_text("base: runs/base\noutput: runs/sft\nlearner:\n  lr: 0.01\n  zero_stage: 2\nseeds: [0, 1]\n")
    cfg = load_config(SFTConfig, f, ["learner.lr=1e-4", "seeds=[3,4,5]", "data.max_seq_len=64"])
    assert cfg.learner.lr == 1e-4 and cfg.learner.zero_stage == 2
    assert cfg.seeds == [3, 4, 5] and cfg.data.max_seq_len == 64
    # the dumped config loads back to the same thing
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(SFTConfig, again) == cfg


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, ["base=a", "output=b", "learner.lrr=1e-4"])
    msg = str(e.value)
    assert "unknown key 'learner.lrr'" in msg and "lr" in msg and "zero_stage" in msg


def test_bad_values_name_key_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, ["base=a", "output=b", "learner.zero_stage=4"])
    assert "learner.zero_stage" in str(e.value) and "0, 1, 2 or 3" in str(e.value)
    with pytest.raises(ConfigError, match="learner.precision"):
        load_config(SFTConfig, None, ["base=a", "output=b", "learner.precision=fp8"])
    with pytest.raises(ConfigError, match="learner.lr"):
        load_config(SFTConfig, None, ["base=a", "output=b", "learner.lr=-1"])
    with pytest.raises(ConfigError, match="base"):
        load_config(SFTConfig, None, ["output=b"])
    with pytest.raises(ConfigError, match="learner.offload_params: Value error, offload_params needs zero_stage: 3"):
        load_config(SFTConfig, None, ["base=a", "output=b", "learner.zero_stage=2", "learner.offload_params=true"])
    assert LearnerConfig(zero_stage=3, offload_params=True).offload_params
    with pytest.raises(ConfigError, match="world.weights"):
        load_config(SFTConfig, None, ["base=a", "output=b", "world.weights=[1,0]"])


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(SFTConfig, lst)
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["learner.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"learner": 3}, ["learner.lr=1"])


def test_vllm_engine_options_for_rollout_and_serve():
    """enforce_eager follows the device unless set; the other options reach vLLM as given; tensor
    parallelism needs that many GPUs on the actor; Serve's batching and LoRA limits are checked."""
    from rayalign.config.schema import RolloutConfig, ServeConfig, VLLMOptions

    assert VLLMOptions().engine_kwargs(gpu=False) == {"enforce_eager": True, "tensor_parallel_size": 1,
                                                      "max_model_len": None}
    assert VLLMOptions().engine_kwargs(gpu=True)["enforce_eager"] is False  # CUDA graphs on a GPU
    kw = VLLMOptions(enforce_eager=True, tensor_parallel_size=2, max_num_seqs=64, max_model_len=4096,
                     enable_prefix_caching=False).engine_kwargs(gpu=True)
    assert kw == {"enforce_eager": True, "tensor_parallel_size": 2, "max_model_len": 4096, "max_num_seqs": 64,
                  "enable_prefix_caching": False}
    with pytest.raises(ValueError, match="tensor_parallel_size = 2 .* rollout.resources.num_gpus = 1"):
        RolloutConfig.model_validate({"vllm": {"tensor_parallel_size": 2}, "resources": {"num_gpus": 1}})
    assert RolloutConfig.model_validate({"vllm": {"tensor_parallel_size": 2},
                                         "resources": {"num_gpus": 2}}).vllm.tensor_parallel_size == 2
    fam = {"name": "f", "models": ["a", "b"], "objectives": ["x", "y"]}
    serve = {"model_store": ".", "families": [fam]}
    with pytest.raises(ValueError, match="tensor_parallel_size = 4 .* replica_gpus = 1"):
        ServeConfig.model_validate({**serve, "vllm": {"tensor_parallel_size": 4}, "replica_gpus": 1})
    with pytest.raises(ValueError, match="batching: continuous needs vLLM"):
        ServeConfig.model_validate({**serve, "engine": "hf", "batching": "continuous"})
    with pytest.raises(ValueError, match="max_cpu_loras 4 < max_loras 16"):
        ServeConfig.model_validate({**serve, "max_cpu_loras": 4})
    with pytest.raises(ValueError, match="weights"):
        ServeConfig.model_validate({**serve, "families": [{**fam, "weights": "lora"}]})


def test_a_partial_section_keeps_the_sections_own_defaults(tmp_path):
    """RLConfig's actor defaults to LearnerConfig(lr=1e-5, ...): setting one of its keys, by
    override or YAML, must not reset the others to LearnerConfig's class defaults (lr 1e-3)."""
    from rayalign.config.schema import RLConfig, RMConfig

    cfg = load_config(RLConfig, None, ["policy=p", "output=o", "learner.actor.micro_batch_size=8",
                                       "learner.critic.micro_batch_size=8", "learner.critic.zero_stage=2"])
    assert (cfg.learner.actor.lr, cfg.learner.actor.micro_batch_size) == (1e-5, 8)
    assert (cfg.learner.critic.lr, cfg.learner.critic.zero_stage) == (1e-4, 2)
    path = tmp_path / "rm.yaml"
    path.write_text("base: b\noutput: o\nlearner: {grad_accum: 2}\n")
    rm = load_config(RMConfig, path)
    assert (rm.learner.lr, rm.learner.grad_accum) == (5e-4, 2)
    assert load_config(RLConfig, None, ["policy=p", "output=o", "learner.actor.lr=3e-4"]).learner.actor.lr == 3e-4


def test_reference_dtype_follows_the_learner_unless_asked():
    from rayalign.config.schema import reference_dtype

    assert reference_dtype("auto", "fp32") == "float32"  # not bfloat16 on a GPU: KL 0 at step 0
    assert reference_dtype("auto", "bf16") == "bfloat16"
    assert reference_dtype("float16", "fp32") == "float16"


def test_estimator_names_come_from_the_registry_and_decide_critic_and_kl():
    from rayalign.config.schema import PPOAlgoConfig, RLConfig
    from rayalign.losses.advantages import ADVANTAGES

    assert set(ADVANTAGES) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"}
    with pytest.raises(ConfigError, match="unknown advantage estimator 'ppo2'; registered: dr_grpo, gae, grpo"):
        load_config(RLConfig, None, ["policy=p", "output=o", "algo.estimator=ppo2"])
    assert PPOAlgoConfig().needs_critic and not PPOAlgoConfig().kl_in_loss  # PPO: critic, KL in the reward
    assert PPOAlgoConfig(estimator="grpo").kl_in_loss and not PPOAlgoConfig(estimator="grpo").needs_critic
    assert not PPOAlgoConfig(estimator="grpo", kl_mode="reward").kl_in_loss
    assert not PPOAlgoConfig(estimator="rloo").kl_in_loss and PPOAlgoConfig(estimator="gae", kl_mode="loss").kl_in_loss
    with pytest.raises(ConfigError, match="'grpo' compares the samples of each prompt: rollout.n must be >= 2"):
        load_config(RLConfig, None, ["policy=p", "output=o", "algo.estimator=grpo", "rollout.n=1"])
    # no critic: its micro-batch does not have to divide the samples
    load_config(RLConfig, None, ["policy=p", "output=o", "algo.estimator=rloo", "rollout.n=2", "prompts_per_step=4",
                                 "learner.actor.micro_batch_size=8", "learner.critic.micro_batch_size=16"])


def test_cli_train_methods_are_the_registrys():
    from rayalign.cli import Method
    from rayalign.losses.advantages import ADVANTAGES
    from rayalign.losses.preference import PREFERENCE_LOSSES

    critic_free = {name for name in ADVANTAGES if name != "gae"}
    assert {m.value for m in Method} == {"ppo", "salsa"} | critic_free | set(PREFERENCE_LOSSES)
    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp", "spo", "dpo", "ipo"} <= {m.value for m in Method}


def test_weight_sync_kinds_come_from_the_registry():
    from rayalign.config.schema import RLConfig
    from rayalign.sync import sync_kinds

    assert sync_kinds() == ["collective", "object_store"]
    cfg = load_config(RLConfig, None, ["policy=p", "output=o", "sync.kind=object_store", "sync.timeout_s=5"])
    assert cfg.sync.kind == "object_store" and cfg.sync.timeout_s == 5
    with pytest.raises(ConfigError, match="unknown weight sync 'nccl'; registered: collective, object_store"):
        load_config(RLConfig, None, ["policy=p", "output=o", "sync.kind=nccl"])
