"""ExPO: the alpha search on dev rollouts, the extrapolated model on disk, and the checks on the
(theta_0, theta_1) pair. Tiny models in-process; the reward-model path runs in the quick demo."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from rayalign.config.core import ConfigError, load_config
from rayalign.config.schema import ExpoConfig
from rayalign.merge.engine import MergeValidationError
from rayalign.merge.io import read_state_dict
from rayalign.models.checkpoint import save_model
from rayalign.models.presets import model_config
from rayalign.recipes.expo import check_pair, choose_alpha, pair_distance, run_expo
from rayalign.utils.io import OutputExistsError
from tests.conftest import run_cli_here

_weights = read_state_dict


@pytest.fixture(scope="module")
def pair(tokenizer_and_preset, tmp_path_factory):
    tok, theta0 = tokenizer_and_preset
    model = LlamaForCausalLM.from_pretrained(theta0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    theta1 = tmp_path_factory.mktemp("expo") / "aligned"
    save_model(model, tok, theta1)
    return theta0, theta1


def _cfg(theta0, theta1, out, *extra):
    return load_config(ExpoConfig, None, [f"sft={theta0}", f"aligned={theta1}", f"output={out}", "reward.kind=gold",
                                          "alphas=[0.5,0,1.0]", "dev.prompts.limit=3", "dev.samples_per_prompt=1",
                                          "dev.max_new_tokens=6", *extra])


def test_expo_searches_alpha_and_writes_the_extrapolated_model(pair, tmp_path):
    theta0, theta1 = pair
    out = tmp_path / "expo"
    result = run_expo(_cfg(theta0, theta1, out))
    assert [p["alpha"] for p in result["curve"]] == [0.0, 0.5, 1.0]  # sorted, each scored on the dev prompts
    eligible = [p for p in result["curve"] if p["alpha"] == 0 or p["gain"] > p["gain_se"]]
    assert result["alpha"] == max(eligible, key=lambda p: (p["reward"], -p["alpha"]))["alpha"]
    assert result["dev_prompts"] == 3 and 0 < result["distance"] < 0.5 and result["warning"] is None
    w0, w1, w2 = _weights(theta0), _weights(theta1), _weights(out / "model")
    a = result["alpha"]
    for name in w0:
        assert torch.allclose(w2[name], w1[name] + a * (w1[name] - w0[name]), atol=1e-6), name
    assert (out / "reward_vs_alpha.png").stat().st_size > 0
    assert json.loads((out / "expo.json").read_text())["alpha"] == a
    with pytest.raises(OutputExistsError):
        run_expo(_cfg(theta0, theta1, out))
    assert run_expo(_cfg(theta0, theta1, out), resume=True)["alpha"] == a  # finished: kept as it is


def test_choose_alpha_needs_a_gain_beyond_its_standard_error():
    import numpy as np

    def pick(per_prompt, min_se=1.0):
        curve = [{"alpha": a, "reward": float(np.mean(r))} for a, r in sorted(per_prompt.items())]
        return choose_alpha(curve, {a: np.asarray(r, dtype=float) for a, r in per_prompt.items()}, min_se), curve

    # a steady gain on every prompt: chosen
    alpha, curve = pick({0.0: [1, 2, 3, 4], 0.1: [1.1, 2.1, 3.1, 4.1], 0.2: [1.2, 2.2, 3.0, 4.2]})
    assert alpha == 0.2 and curve[1]["gain"] == pytest.approx(0.1) and curve[1]["gain_se"] == pytest.approx(0.0)
    # a larger mean built on one lucky prompt: gain 0.25, paired s.e. 0.25 -> not beyond 1 s.e.
    alpha, curve = pick({0.0: [1, 1, 1, 1], 0.5: [1, 1, 1, 2]})
    assert alpha == 0.0 and curve[1]["gain"] == pytest.approx(0.25) and curve[1]["gain_se"] == pytest.approx(0.25)
    assert pick({0.0: [1, 1, 1, 1], 0.5: [1, 1, 1, 2]}, min_se=0.0)[0] == 0.5  # 0: plain argmax
    # no candidate better than theta_1: keep it
    assert pick({0.0: [2, 2, 2], 0.3: [1, 1, 1]})[0] == 0.0


def test_expo_refuses_other_architectures_and_warns_on_odd_pairs(pair, tokenizer_and_preset, tmp_path):
    tok, theta0 = tokenizer_and_preset
    wide = model_config("tiny", tok)
    wide.intermediate_size = 256
    save_model(LlamaForCausalLM(wide), tok, tmp_path / "wide")
    with pytest.raises(MergeValidationError, match="architecture differs: intermediate_size"):
        run_expo(_cfg(theta0, tmp_path / "wide", tmp_path / "never"))
    assert not (tmp_path / "never" / "model").exists()
    w0 = _weights(theta0)
    assert pair_distance(w0, w0) == 0.0
    assert "does nothing" in check_pair(0.0, "a", "b")
    assert "do not look like an SFT model" in check_pair(0.9, "a", "b")
    assert check_pair(0.05, "a", "b") is None


def test_expo_config_errors():
    with pytest.raises(ConfigError, match="reward.model is required"):
        load_config(ExpoConfig, None, ["sft=a", "aligned=b", "output=c"])
    with pytest.raises(ConfigError, match="alphas must be finite and >= 0"):
        load_config(ExpoConfig, None, ["sft=a", "aligned=b", "output=c", "reward.kind=gold", "alphas=[0.1,-1]"])


def test_merged_model_re_merges_in_place(pair):
    from rayalign.eval.merged import MergedModel

    theta0, theta1 = pair
    merged = MergedModel([theta0, theta1])
    w0, w1 = _weights(theta0), _weights(theta1)
    for coefs in ([-0.5, 1.5], [1.75, -0.75], [0.0, 1.0]):  # ExPO, a Bone Soup lambda, theta_1 itself
        sd = merged.set(coefs).state_dict()
        for name in w0:
            assert torch.allclose(sd[name], coefs[0] * w0[name] + coefs[1] * w1[name], atol=1e-6), (coefs, name)


def test_expo_and_soups_commands_with_the_reward_model(quick_demo, tmp_path):

    d = quick_demo
    args = [f"sft={d / 'sft/sft-0'}", f"aligned={d / 'dpo/policy'}", f"reward.model={d / 'rm/model'}",
            "alphas=[0,1]", "dev.prompts.limit=2", "dev.samples_per_prompt=1", "dev.max_new_tokens=8"]
    proc = run_cli_here("expo", *args, f"output={tmp_path / 'x'}", check=True)
    assert "alpha 0.00: dev reward" in proc.stdout and "chosen alpha" in proc.stdout
    result = json.loads((tmp_path / "x" / "expo.json").read_text())
    assert result["scorer"] == "model" and all("gold" in p for p in result["curve"])  # the truth, for the report
    assert result["gold_alpha"] in (0.0, 1.0) and result["alpha"] in (0.0, 1.0)
    # bad input: a clear error, exit 2, nothing written
    bad = run_cli_here("expo", *args[:1], f"aligned={tmp_path / 'nope'}", *args[2:], f"output={tmp_path / 'y'}")
    assert bad.returncode == 2 and "model directory not found" in bad.stderr and not (tmp_path / "y").exists()
    bad = run_cli_here("soups", f"policy={d / 'sft/sft-0'}", f"output={tmp_path / 'z'}", "objectives=[informative]")
    assert bad.returncode == 2 and "objectives" in bad.stderr and not (tmp_path / "z").exists()


def test_expo_takes_a_lora_aligned_model_and_writes_one_adapter(pair, tmp_path):
    """theta_1 a PEFT adapter on theta_0: the alpha search runs on base + B A, and the extrapolated
    model is the adapter theta_0 + (1 + alpha) B A, written as one PEFT adapter."""
    from peft import LoraConfig, get_peft_model

    theta0, _ = pair
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(theta0),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     base_model_name_or_path=str(theta0)))
    torch.manual_seed(2)
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    adapter = tmp_path / "aligned-lora"
    peft.save_pretrained(adapter)
    out = tmp_path / "expo"
    result = run_expo(_cfg(theta0, adapter, out, "min_gain_se=0", "alphas=[0.5]"))
    assert result["alpha"] in (0.0, 0.5)
    assert (out / "model" / "adapter_config.json").is_file() and not (out / "model" / "model.safetensors").exists()
    w0, w1, w2 = _weights(theta0), _weights(adapter), _weights(out / "model")
    a = result["alpha"]
    for name in w0:
        assert torch.allclose(w2[name], w1[name] + a * (w1[name] - w0[name]), atol=1e-6), name
