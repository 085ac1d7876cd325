"""LoRA adapters as merge ingredients and trainer outputs, in-process: the exact combination of
adapters (arXiv:2106.09685; PEFT's `cat`) against hand-computed values, the merge engine writing
one combined adapter that plain PEFT loads and that equals the full-weight merge of the same
experts, adapters inside full-weight merges, mergekit's BASE+LORA syntax, SFT and reward-model
adapters, and every bad input named with nothing written."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from rayalign.config.core import ConfigError, load_config
from rayalign.config.schema import LoraConfig, RLConfig, RMConfig, SFTConfig
from rayalign.merge.engine import merge_to_disk
from rayalign.merge.io import MergeInputError
from rayalign.merge.lora import Adapter, combine, load_adapter
from rayalign.merge.spec import MergeSpec, parse_spec
from rayalign.models.checkpoint import CheckpointError, check_dir, load_causal_lm
from rayalign.models.lora import AdapterError, apply_lora

TOK_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# ---- the combination, by hand ------------------------------------------------------------------

def test_combine_is_the_exact_weighted_sum_of_deltas_with_negative_weights_and_a_module_union():
    """B = [c1 s1 B1 | c2 s2 B2], A = [A1; A2] gives c1 s1 B1 A1 + c2 s2 B2 A2 exactly; a module only
    the first adapter has gets zero blocks for the second (rank padded, nothing added)."""
    a1, b1 = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[1.0], [3.0]])                     # r = 1, s = 2
    a2, b2 = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # r = 2, s = 0.5
    x = Adapter("base", {"q": (a1, b1, 2.0), "v": (a1, b1, 2.0)})
    y = Adapter("base", {"q": (a2, b2, 0.5)})
    c = combine([x, y], [1.5, -0.5])
    # q: 1.5 * 2 * B1 A1 - 0.5 * 0.5 * B2 A2, by hand
    want_q = torch.tensor([[3.0, 0.0, 6.0], [9.0, 0.0, 18.0]]) - 0.25 * torch.tensor([[0.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    assert torch.allclose(c.delta("q").float(), want_q)
    assert torch.allclose(c.delta("v").float(), 3.0 * b1 @ a1)
    assert c.rank == 3 and c.modules["v"][0].shape == (3, 3) and c.modules["q"][2] == 1.0
    assert c.config["r"] == c.config["lora_alpha"] == 3  # scaling 1: the weights sit in B


def test_combine_refuses_adapters_on_different_bases():
    a, b = torch.ones(1, 2), torch.ones(2, 1)
    with pytest.raises(MergeInputError, match="different bases"):
        combine([Adapter("/m/one", {"q": (a, b, 1.0)}), Adapter("/m/two", {"q": (a, b, 1.0)})], [0.5, 0.5])


# ---- adapters on disk ---------------------------------------------------------------------------

def _adapter(base, out, seed, targets, r=4):
    """A PEFT adapter with random A and B (B is zero at PEFT's init) saved the standard way,
    and the full model it stands for (merge_and_unload) beside it."""
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, PeftLoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                base_model_name_or_path=str(base)))
    torch.manual_seed(seed)
    for n, p in peft.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.2)
    peft.save_pretrained(out)
    full = out.parent / f"{out.name}-full"
    peft.merge_and_unload().save_pretrained(full)
    for f in TOK_FILES:
        for d in (out, full):
            shutil.copy(base / f, d / f)
    return out, full


@pytest.fixture(scope="module")
def experts(checkpoints, tmp_path_factory):
    base = checkpoints["base"]
    root = tmp_path_factory.mktemp("adapters")
    a = _adapter(base, root / "a", 0, ["q_proj", "v_proj", "down_proj"], r=4)
    b = _adapter(base, root / "b", 1, ["q_proj", "k_proj", "o_proj", "up_proj"], r=8)
    return base, a, b


def _sd(path):
    return load_causal_lm(path)[0].state_dict()


def _peft_full(base, adapter):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).merge_and_unload().state_dict()


def _max_diff(x, y):
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_combined_adapter_loaded_by_plain_peft_equals_the_full_weight_merge(experts, tmp_path):
    """Weights 1.4 and -0.4 on adapters of ranks 4 and 8 with different target modules: one adapter of
    rank 12 over the union, loaded by plain PEFT, equals merging the experts' full models, to 1e-5."""
    base, (a, a_full), (b, b_full) = experts
    spec = MergeSpec(method="linear", models=[{"model": str(a), "weight": 1.4}, {"model": str(b), "weight": -0.4}])
    report = merge_to_disk(spec, tmp_path / "comb", progress=False)
    cfg = json.loads((tmp_path / "comb" / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and sorted(cfg["target_modules"]) == ["down_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                                 "v_proj"]
    assert not (tmp_path / "comb" / "model.safetensors").exists() and report.bytes_written < 200_000
    full = MergeSpec(method="linear", models=[{"model": str(a_full), "weight": 1.4}, {"model": str(b_full), "weight": -0.4}])
    merge_to_disk(full, tmp_path / "full", progress=False)
    assert _max_diff(_peft_full(base, tmp_path / "comb"), _sd(tmp_path / "full")) < 1e-5
    # the same merge written as a full model from the adapters
    merge_to_disk(spec.model_copy(update={"output": "full"}), tmp_path / "as-full", progress=False)
    assert _max_diff(_sd(tmp_path / "as-full"), _sd(tmp_path / "full")) < 1e-5


def test_bone_soup_expo_and_task_arithmetic_of_adapters_are_exact(experts, tmp_path):
    """Bone Soups (negative lambda from B^-1 mu, then k = 1.3 against the SFT anchor = the base), ExPO
    with theta_0 itself an adapter, and task arithmetic: each is one adapter equal to its full merge."""
    base, (a, a_full), (b, b_full) = experts
    cases = {
        "bone": ({"method": "bone_soup", "mu": [0.9, 0.1], "beta": 0.7, "k": 1.3, "base_model": str(base)},
                 [a, b], [a_full, b_full]),
        "expo": ({"method": "expo", "alpha": 0.5}, [b], [b_full], a, a_full),
        "task": ({"method": "task_arithmetic", "base_model": str(base)}, [a, b], [a_full, b_full]),
    }
    for name, (spec, ads, fulls, *theta0) in cases.items():
        weights = {"task": [0.6, -0.3]}.get(name, [None] * len(ads))
        as_adapter = dict(spec, models=[{"model": str(p), "weight": w} for p, w in zip(ads, weights)])
        as_full = dict(spec, models=[{"model": str(p), "weight": w} for p, w in zip(fulls, weights)])
        if theta0:
            as_adapter["base_model"], as_full["base_model"] = str(theta0[0]), str(theta0[1])
        merge_to_disk(MergeSpec(**as_adapter), tmp_path / f"{name}-ad", progress=False)
        merge_to_disk(MergeSpec(**as_full), tmp_path / f"{name}-full", progress=False)
        assert (tmp_path / f"{name}-ad" / "adapter_config.json").is_file(), name
        assert _max_diff(_peft_full(base, tmp_path / f"{name}-ad"), _sd(tmp_path / f"{name}-full")) < 1e-5, name
    meta = json.loads((tmp_path / "bone-ad" / "rayalign_merge.json").read_text())
    assert min(meta["adapter_coefficients"]) < 0  # Bone Soup's lambda has a negative entry here


def test_in_memory_peft_models_combine_like_their_directories(experts):
    """adapter_from_peft reads a live PeftModel; its combination equals the one read from disk."""
    from rayalign.merge.lora import adapter_from_peft

    base, (a, _), (b, _) = experts
    live = [adapter_from_peft(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(p)))
            for p in (a, b)]
    disk = [load_adapter(a), load_adapter(b)]
    x, y = combine(live, [1.4, -0.4]), combine(disk, [1.4, -0.4])
    assert x.modules.keys() == y.modules.keys()
    for m in x.modules:
        assert torch.allclose(x.delta(m), y.delta(m), atol=1e-12), m


def test_mergekit_yaml_with_base_plus_lora_models(experts, tmp_path):
    """mergekit's `BASE+LORA` model references; mergekit writes a full model, `output: adapter` an adapter."""
    base, (a, a_full), (b, b_full) = experts
    data = {"merge_method": "linear", "models": [{"model": f"{base}+{a}", "parameters": {"weight": 3.0}},
                                                 {"model": f"{base}+{b}", "parameters": {"weight": 1.0}}]}
    merge_to_disk(parse_spec(data), tmp_path / "mk", progress=False)  # normalised: 0.75 / 0.25
    merge_to_disk(MergeSpec(method="linear", models=[{"model": str(a_full), "weight": 0.75},
                                                     {"model": str(b_full), "weight": 0.25}]), tmp_path / "ref", progress=False)
    assert (tmp_path / "mk" / "model.safetensors").is_file()
    assert _max_diff(_sd(tmp_path / "mk"), _sd(tmp_path / "ref")) < 1e-5
    merge_to_disk(parse_spec({**data, "output": "adapter"}), tmp_path / "mk-ad", progress=False)
    assert _max_diff(_peft_full(base, tmp_path / "mk-ad"), _sd(tmp_path / "ref")) < 1e-5
    with pytest.raises(ConfigError, match="trained on base"):
        parse_spec({**data, "models": [{"model": f"{a_full}+{a}", "parameters": {"weight": 1.0}}]})


def test_bad_adapters_are_named_and_nothing_is_written(experts, tmp_path, checkpoints):
    base, (a, _), (b, _) = experts
    out = tmp_path / "out"

    def refused(spec, match):
        with pytest.raises((MergeInputError, ValueError), match=match):
            merge_to_disk(MergeSpec(**spec), out, progress=False)
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

    lin = lambda *ms: {"method": "linear", "models": [{"model": str(m), "weight": w} for m, w in ms]}
    # coefficients not summing to one: no exact adapter (a full output is fine)
    refused({**lin((a, 0.5), (b, 0.3)), "output": "adapter"}, "sum to 0.8")
    # an adapter made for another base: the recorded base, and the shapes
    other = tmp_path / "other"
    shutil.copytree(a, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(checkpoints["a"])}))
    refused({**lin((other, 0.5), (b, 0.5)), "output": "adapter"}, "different bases")
    with pytest.raises(MergeInputError, match="trained on base"):
        load_adapter(other, base=str(base))
    # a corrupt or truncated adapter file
    cut = tmp_path / "cut"
    shutil.copytree(a, cut)
    data = (cut / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(data[:len(data) - 100])
    refused(lin((cut, 0.5), (b, 0.5)), "truncated|past the end")
    with pytest.raises(CheckpointError, match="truncated|past the end"):
        check_dir(cut)
    bad = tmp_path / "badcfg"
    shutil.copytree(a, bad)
    (bad / "adapter_config.json").write_text("{not json")
    refused(lin((bad, 0.5), (b, 0.5)), "corrupt")
    # a LoRA config on a module the model lacks
    with pytest.raises(AdapterError, match=r"no linear module named \['wq'\].*q_proj"):
        apply_lora(load_causal_lm(base)[0], LoraConfig(r=4, target_modules=["wq", "q_proj"]))


def test_an_adapter_for_a_differently_shaped_base_is_refused(checkpoints, tmp_path):
    """Same module names, other shapes (the small preset's adapter claimed for the tiny base)."""
    small = tmp_path / "small"
    from rayalign.models.checkpoint import load_tokenizer
    from rayalign.models.presets import build_preset

    build_preset("small", small, load_tokenizer(checkpoints["base"]))
    ad, _ = _adapter(small, tmp_path / "ad", 0, ["q_proj"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(checkpoints["base"])}))
    with pytest.raises(MergeInputError, match="another base"):
        merge_to_disk(MergeSpec(method="expo", alpha=0.3, base_model=str(checkpoints["base"]),
                                models=[{"model": str(ad)}]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_rank_vllm_cannot_serve_is_refused_at_config_load():
    with pytest.raises(ConfigError, match=r"up to 512.*\[1, 8, 16, 32, 64, 128, 256, 320, 512\]"):
        load_config(RLConfig, None, ["policy=p", "output=o", "learner.actor.lora.r=600"])
    with pytest.raises(ConfigError, match="vLLM applies LoRA to"):
        load_config(RLConfig, None, ["policy=p", "output=o", "learner.actor.lora.r=8",
                                     "learner.actor.lora.target_modules=[lm_head]"])
    # the transformers engine serves any rank
    load_config(RLConfig, None, ["policy=p", "output=o", "learner.actor.lora.r=600", "rollout.engine=hf"])


# ---- trainers ------------------------------------------------------------------------------------

def test_sft_and_reward_model_train_lora_adapters(quick_demo, tmp_path):
    """`rayalign sft` with a LoRA block writes a PEFT adapter per seed (and the merged model); the
    reward model trains LoRA plus a full score head, and loads back with its trained head."""
    from rayalign.models.checkpoint import load_reward_model
    from rayalign.recipes.supervised import run_rm, run_sft

    base = quick_demo / "base" / "model"
    sft = run_sft(load_config(SFTConfig, None, [f"base={base}", f"output={tmp_path / 'sft'}", "seeds=[0]",
                                                "epochs=0.2", "learner.lora.r=8", "learner.lora.save_merged=true"]))[0]
    assert {"adapter_config.json", "adapter_model.safetensors", "merged"} <= {p.name for p in sft.iterdir()}
    assert json.loads((sft / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(sft))
        got = peft(ids).logits
        assert torch.allclose(got, AutoModelForCausalLM.from_pretrained(sft / "merged")(ids).logits, atol=1e-5)
        assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(base)(ids).logits, atol=1e-3)
    rm = run_rm(load_config(RMConfig, None, [f"base={base}", f"output={tmp_path / 'rm'}", "epochs=0.3",
                                             "learner.lora.r=8", "learner.lora.save_merged=true", "objectives=each"]))
    names = list(json.loads((rm / "adapter_model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (rm / "adapter_model.safetensors").read_bytes()[:8], "little")]))
    assert "base_model.model.score.weight" in names and any("lora_A" in n for n in names)
    acc = json.loads((tmp_path / "rm" / "heldout_accuracy.json").read_text())
    model, _ = load_reward_model(rm)
    assert model.score.weight.shape[0] == 3
    # the loaded head is the trained one: scores equal the learner's held-out accuracy computation
    from rayalign.config.schema import DataConfig, WorldConfig
    from rayalign.models.checkpoint import load_tokenizer
    from rayalign.recipes.supervised import encode_pairs, preference_rows, rm_accuracy

    tok = load_tokenizer(rm)
    held = encode_pairs(tok, preference_rows(DataConfig(), WorldConfig(), "each", "test"), 96)
    assert rm_accuracy(model, held, tok.pad_token_id) == pytest.approx(acc)
    merged, _ = load_reward_model(rm / "merged")
    assert rm_accuracy(merged, held, tok.pad_token_id) == pytest.approx(acc)
