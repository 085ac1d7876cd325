"""The merge engine: kernels against hand-computed values, Bone Soup coefficients against numpy,
on-disk merges (sharded in and out, dtypes), validation errors, atomicity, in-memory API."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from rayalign.merge import kernels
from rayalign.merge.coefficients import backbone_rewards, bone_matrix, bone_soup_coefficients
from rayalign.merge.engine import MergeValidationError, merge_into, merge_state_dicts, merge_to_disk
from rayalign.merge.io import Checkpoint, MergeInputError, read_state_dict
from rayalign.merge.methods import MERGE_METHODS, MergeMethod, Plan, merge_method, preference_methods, register_merge_method
from rayalign.merge.spec import MergeSpec, parse_spec, resolve
from rayalign.models.checkpoint import save_model
from rayalign.models.presets import model_config
from rayalign.utils.io import OutputExistsError
from tests.conftest import run_cli, run_cli_here

A, B, C = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0])


# ---- pure kernels and coefficients ---------------------------------------------------------

def test_kernels_hand_computed():
    assert kernels.linear([A, B], [0.25, 0.75]).tolist() == [2.5, 3.5]
    assert kernels.linear([A, B], [1.75, -0.75]).tolist() == [-0.5, 0.5]  # negative weights, no renormalising
    assert kernels.linear([A, B], [1.0, 3.0], normalize=True).tolist() == [2.5, 3.5]
    assert kernels.linear([A, B], [1.0, 3.0]).tolist() == [10.0, 14.0]
    # base + 0.5 (A - base) + 1 (C - base) with base = [1, 1]... here base=C, models A, B
    assert kernels.task_arithmetic(C, [A, B], [0.5, 1.0]).tolist() == [3.0, 4.5]
    assert kernels.expo(A, torch.tensor([2.0, 2.0]), 0.5).tolist() == [2.5, 2.0]
    assert kernels.extrapolate(B, A, 1.5).tolist() == [4.0, 5.0]
    # bf16 inputs accumulate in float32
    out = kernels.linear([A.bfloat16(), B.bfloat16()], [0.5, 0.5])
    assert out.dtype == torch.float32 and out.tolist() == [2.0, 3.0]


def test_bone_soup_closed_form_matches_numpy_inverse():
    assert bone_soup_coefficients([1.0, 0.0], 0.7) == pytest.approx([1.75, -0.75])
    rng = np.random.default_rng(0)
    for n in (2, 3, 5):
        for beta in (0.55, 0.7, 0.95):
            mu = rng.dirichlet(np.ones(n))
            lam = bone_soup_coefficients(mu, beta)
            np.testing.assert_allclose(lam, np.linalg.inv(bone_matrix(n, beta)) @ mu, rtol=1e-12, atol=1e-12)
            assert lam.sum() == pytest.approx(1.0)
            B_ = bone_matrix(n, beta)
            np.testing.assert_allclose(B_, B_.T)
            np.testing.assert_allclose(B_.sum(axis=1), 1.0)
    np.testing.assert_allclose(backbone_rewards(np.array([1.0, 0.0]), 0.7), [0.7, 0.3])
    with pytest.raises(ValueError, match=r"beta must lie in \(1/2, 1\)"):
        bone_soup_coefficients([0.5, 0.5], 0.4)


def test_merge_method_registry_holds_each_methods_coefficients():
    assert sorted(MERGE_METHODS) == ["bone_soup", "expo", "linear", "task_arithmetic"]
    assert preference_methods() == ["linear", "bone_soup"]
    bone = merge_method("bone_soup")
    # lambda = B^-1 mu = (mu - c) / (beta - c), c = 0.3: (1 - 0.3) / 0.4 = 1.75, (0 - 0.3) / 0.4 = -0.75
    assert bone.preference_coefficients([1.0, 0.0], beta=0.7) == pytest.approx([1.75, -0.75])
    # k = 1.2 against the SFT anchor: 1.2 * lambda, then 1 - 1.2 = -0.2 on the anchor
    assert bone.preference_coefficients([1.0, 0.0], beta=0.7, k=1.2) == pytest.approx([2.1, -0.9, -0.2])
    assert bone.preference_coefficients([1.0, 0.0], beta=0.7, anchor=True) == pytest.approx([1.75, -0.75, 0.0])
    assert merge_method("linear").preference_coefficients([0.3, 0.7]) == pytest.approx([0.3, 0.7])
    with pytest.raises(ValueError, match="extrapolates against an anchor model"):
        merge_method("linear").preference_coefficients([0.3, 0.7], k=1.5, anchor=False)
    with pytest.raises(ValueError, match="does not map a preference"):
        merge_method("expo").preference_coefficients([0.3, 0.7])
    with pytest.raises(ValueError, match="unknown merge method 'ties'; registered: bone_soup, expo, linear, "
                                         "task_arithmetic"):
        merge_method("ties")
    with pytest.raises(ValueError, match="unknown merge method 'ties'; registered: "):
        MergeSpec(method="ties", models=[{"model": "a", "weight": 1.0}])
    # the spec's plan is the method's: effective coefficients on the inputs in kernel order
    spec = MergeSpec(method="bone_soup", models=[{"model": "a"}, {"model": "b"}], mu=[1.0, 0.0], beta=0.7,
                     base_model="sft", k=1.2)
    plan = resolve(spec)
    assert plan.paths == ["a", "b", "sft"] and plan.coefficients == pytest.approx([2.1, -0.9, -0.2])
    assert plan.kernel([A, B, C]).tolist() == pytest.approx((2.1 * A - 0.9 * B - 0.2 * C).tolist())


def test_a_registered_merge_method_is_one_class():
    @register_merge_method
    class Difference(MergeMethod):  # theta_a - theta_b, a made-up method for the test
        name = "difference_for_test"
        paper = "none"

        def check(self, spec):
            if len(spec.models) != 2:
                raise ValueError("difference_for_test needs exactly 2 models")

        def plan(self, spec):
            a, b = (e.model for e in spec.models)
            return Plan([a, b], lambda ts: kernels.linear(ts, [1.0, -1.0]), [1.0, -1.0], a)

    try:
        spec = MergeSpec(method="difference_for_test", models=[{"model": "a"}, {"model": "b"}])
        assert resolve(spec).kernel([A, B]).tolist() == [-2.0, -2.0]
        with pytest.raises(ValueError, match="needs exactly 2 models"):
            MergeSpec(method="difference_for_test", models=[{"model": "a"}])
        with pytest.raises(ValueError, match="already registered"):
            register_merge_method(Difference)
    finally:
        MERGE_METHODS.pop("difference_for_test")


def test_spec_validation_errors():
    m = [{"model": "a", "weight": 1.0}, {"model": "b", "weight": 1.0}]
    with pytest.raises(ValueError, match="model list is empty"):
        MergeSpec(method="linear", models=[])
    with pytest.raises(ValueError, match="at least 2 models"):
        MergeSpec(method="linear", models=m[:1])
    with pytest.raises(ValueError, match="needs a weight for every model; missing for \\['b'\\]"):
        MergeSpec(method="linear", models=[m[0], {"model": "b"}])
    with pytest.raises(ValueError, match="task_arithmetic needs base_model"):
        MergeSpec(method="task_arithmetic", models=m)
    with pytest.raises(ValueError, match="not finite"):
        MergeSpec(method="linear", models=[m[0], {"model": "b", "weight": float("nan")}])
    with pytest.raises(ValueError, match="mu has 3 entries for 2 backbone models"):
        MergeSpec(method="bone_soup", models=m, mu=[0.2, 0.3, 0.5], beta=0.7)
    with pytest.raises(ValueError, match="expo needs base_model"):
        MergeSpec(method="expo", models=m[:1], alpha=0.3)


def test_mergekit_yaml_defaults():
    lin = parse_spec({"merge_method": "linear", "dtype": "float32",
                      "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 3}}]})
    assert lin.normalize is True and resolve(lin).coefficients == [0.25, 0.75]
    ta = parse_spec({"merge_method": "task_arithmetic", "base_model": "base",
                     "models": [{"model": "base"}, {"model": "a", "parameters": {"weight": 0.5}}]})
    assert ta.normalize is False and [e.model for e in ta.models] == ["a"]
    assert resolve(ta).paths == ["base", "a"] and resolve(ta).coefficients == [0.5, 0.5]
    with pytest.raises(ValueError, match="merge_method 'ties' is not supported"):
        parse_spec({"merge_method": "ties", "models": []})


# ---- on disk ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tokenizer_and_preset, tmp_path_factory):
    """Three tiny Llamas with different random weights (the first saved in shards, the third in bf16)."""
    tok, _ = tokenizer_and_preset
    root = tmp_path_factory.mktemp("merge_models")
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(model_config("tiny", tok))
        p = root / f"m{seed}"
        if seed == 0:
            m.save_pretrained(p, max_shard_size="200KB")
            tok.save_pretrained(p)
        else:
            save_model(m, tok, p)
        paths.append(p)
    return paths


_weights = read_state_dict


def test_linear_and_task_arithmetic_on_disk_match_hand_math(models, tmp_path):
    assert (models[0] / "model.safetensors.index.json").is_file()  # sharded input
    w = [_weights(p) for p in models]
    spec = MergeSpec(method="linear", models=[{"model": str(models[0]), "weight": 1.75},
                                              {"model": str(models[1]), "weight": -0.75}], max_shard_bytes=150_000)
    rep = merge_to_disk(spec, tmp_path / "lin", progress=False)
    assert (tmp_path / "lin" / "model.safetensors.index.json").is_file()  # sharded output
    out = _weights(tmp_path / "lin")
    for n in w[0]:
        torch.testing.assert_close(out[n], 1.75 * w[0][n] - 0.75 * w[1][n], rtol=0, atol=1e-6)
    assert rep.tensors == len(w[0]) and rep.coefficients == [1.75, -0.75]
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "lin")  # transformers loads the output unchanged
    torch.testing.assert_close(merged.lm_head.weight, out["lm_head.weight"])
    assert (tmp_path / "lin" / "tokenizer.json").is_file()

    ta = MergeSpec(method="task_arithmetic", base_model=str(models[2]),
                   models=[{"model": str(models[0]), "weight": 0.3}, {"model": str(models[1]), "weight": 0.6}])
    merge_to_disk(ta, tmp_path / "ta", progress=False)
    out = _weights(tmp_path / "ta")
    for n in w[0]:
        exp = w[2][n] + 0.3 * (w[0][n] - w[2][n]) + 0.6 * (w[1][n] - w[2][n])
        torch.testing.assert_close(out[n], exp, rtol=0, atol=1e-6)


def test_expo_bone_soup_and_output_dtype(models, tmp_path):
    w = [_weights(p) for p in models]
    merge_to_disk(MergeSpec(method="expo", base_model=str(models[0]), models=[{"model": str(models[1])}], alpha=0.4),
                  tmp_path / "expo", progress=False)
    out = _weights(tmp_path / "expo")
    for n in w[0]:
        torch.testing.assert_close(out[n], w[1][n] + 0.4 * (w[1][n] - w[0][n]), rtol=0, atol=1e-6)
    spec = MergeSpec(method="bone_soup", models=[{"model": str(models[0])}, {"model": str(models[1])}],
                     mu=[1.0, 0.0], beta=0.7, k=1.2, base_model=str(models[2]), dtype="bfloat16")
    merge_to_disk(spec, tmp_path / "bone", progress=False)
    out = load_file(str(tmp_path / "bone" / "model.safetensors"))
    n = "model.layers.0.self_attn.q_proj.weight"
    exp = 1.2 * (1.75 * w[0][n] - 0.75 * w[1][n]) - 0.2 * w[2][n]
    assert out[n].dtype == torch.bfloat16
    torch.testing.assert_close(out[n].float(), exp.bfloat16().float())
    assert json.loads((tmp_path / "bone" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_chunked_streaming_gives_identical_bytes(models, tmp_path):
    """Tensors split into many small chunks merge to the same bytes as whole-tensor chunks."""
    spec = MergeSpec(method="task_arithmetic", base_model=str(models[2]), dtype="bfloat16",
                     models=[{"model": str(models[0]), "weight": 0.7}, {"model": str(models[1]), "weight": -0.2}])
    merge_to_disk(spec, tmp_path / "whole", progress=False)
    merge_to_disk(spec, tmp_path / "chunked", progress=False, chunk_elements=1000)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "chunked")
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "chunked" / "model.safetensors").read_bytes()


def test_empty_and_integer_tensors(tmp_path):
    from safetensors.torch import save_file

    for i in range(2):
        d = tmp_path / f"raw{i}"
        d.mkdir()
        save_file({"a": torch.full((3,), float(i)), "empty": torch.zeros(0), "steps": torch.tensor([7], dtype=torch.int64),
                   "z": torch.full((2, 2), 2.0 * i)}, str(d / "model.safetensors"))
    spec = MergeSpec(method="linear", dtype="bfloat16",
                     models=[{"model": str(tmp_path / "raw0"), "weight": 0.5}, {"model": str(tmp_path / "raw1"), "weight": 0.5}])
    merge_to_disk(spec, tmp_path / "out", progress=False, chunk_elements=2)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["empty"].shape == (0,) and out["a"].tolist() == [0.5] * 3 and out["z"].tolist() == [[1.0, 1.0]] * 2
    assert out["a"].dtype == torch.bfloat16 and out["steps"].dtype == torch.int64


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_mismatches_are_refused_before_writing(models, tokenizer_and_preset, tmp_path):
    tok, _ = tokenizer_and_preset
    ok = str(models[1])

    def refuse(other, match):
        out = tmp_path / "never"
        spec = MergeSpec(method="linear", models=[{"model": ok, "weight": 0.5}, {"model": str(other), "weight": 0.5}])
        with pytest.raises((MergeValidationError, MergeInputError), match=match):
            merge_to_disk(spec, out, progress=False)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    # different architecture
    torch.manual_seed(0)
    wide = model_config("tiny", tok)
    wide.intermediate_size = 256
    save_model(LlamaForCausalLM(wide), tok, tmp_path / "wide")
    refuse(tmp_path / "wide", r"architecture differs: intermediate_size = 192 in .*m1 but 256 in .*wide")
    # missing tensor
    d = _copy(models[2], tmp_path / "fewer")
    sd = load_file(str(d / "model.safetensors"))
    sd.pop("model.norm.weight")
    from safetensors.torch import save_file
    save_file(sd, str(d / "model.safetensors"))
    refuse(d, r"tensor names differ .* only in the first \['model.norm.weight'\]")
    # shape (vocab) mismatch
    torch.manual_seed(0)
    m = LlamaForCausalLM(model_config("tiny", tok))
    m.resize_token_embeddings(len(tok) + 8)
    save_model(m, tok, tmp_path / "bigvocab")
    refuse(tmp_path / "bigvocab", r"vocabulary size differs: vocab_size")
    # tokenizer mismatch
    d = _copy(models[2], tmp_path / "othertok")
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = list(vocab)[300], list(vocab)[301]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    refuse(d, r"tokenizers differ between .*m1 and .*othertok")
    # non-finite weights: named, and nothing written even though earlier tensors merged fine
    d = _copy(models[2], tmp_path / "nan")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"][3] = float("nan")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    refuse(d, r"non-finite values in model.norm.weight of \['.*nan'\]")
    # missing and truncated checkpoints
    refuse(tmp_path / "nowhere", "model directory not found")
    d = _copy(models[2], tmp_path / "trunc")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    refuse(d, "truncated")


def test_existing_output_is_never_overwritten(models, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    spec = MergeSpec(method="linear", models=[{"model": str(models[1]), "weight": 0.5},
                                              {"model": str(models[2]), "weight": 0.5}])
    with pytest.raises(OutputExistsError):
        merge_to_disk(spec, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep").read_text() == "x"


def test_cli_merge_with_mergekit_yaml_and_errors(models, tmp_path):
    cfg = tmp_path / "mk.yaml"
    cfg.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n"
                   f"  - model: {models[1]}\n    parameters: {{weight: 1.0}}\n"
                   f"  - model: {models[2]}\n    parameters: {{weight: 3.0}}\n")
    proc = run_cli_here("merge", str(cfg), str(tmp_path / "out"), check=True)
    assert "merged 21 tensors" in proc.stdout
    w1, w2, out = _weights(models[1]), _weights(models[2]), _weights(tmp_path / "out")
    for n in out:
        torch.testing.assert_close(out[n], (w1[n] + 3 * w2[n]) / 4, rtol=0, atol=1e-6)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"method: linear\nmodels:\n  - model: {models[1]}\n    weight: 1\n")
    proc = run_cli_here("merge", str(bad), str(tmp_path / "out2"))
    assert proc.returncode == 2 and "at least 2 models" in proc.stderr and not (tmp_path / "out2").exists()


# ---- in memory ---------------------------------------------------------------------------------

def test_merge_into_model_in_place(models, tmp_path):
    w = [_weights(p) for p in models]
    target = LlamaForCausalLM.from_pretrained(models[0])
    sources = [w[0], Checkpoint(models[1]), w[2]]  # state dicts and lazy checkpoints mix
    merge_into(target, sources, [0.5, 0.7, -0.2])
    sd = target.state_dict()
    for n in w[0]:
        torch.testing.assert_close(sd[n], 0.5 * w[0][n] + 0.7 * w[1][n] - 0.2 * w[2][n], rtol=0, atol=1e-6)
    # the in-memory result equals the on-disk engine for the same spec
    spec = MergeSpec(method="bone_soup", models=[{"model": str(p)} for p in models], mu=[0.6, 0.3, 0.1], beta=0.8)
    res = resolve(spec)
    merge_into(target, [w[0], w[1], w[2]], res.coefficients)
    merge_to_disk(spec, tmp_path / "bone3", progress=False)
    disk = _weights(tmp_path / "bone3")
    for n, t in target.state_dict().items():
        torch.testing.assert_close(t, disk[n], rtol=0, atol=1e-6)
    merged = merge_state_dicts(w[:2], lambda ts: kernels.expo(ts[0], ts[1], 0.5))
    torch.testing.assert_close(merged["lm_head.weight"], 1.5 * w[1]["lm_head.weight"] - 0.5 * w[0]["lm_head.weight"])
    with pytest.raises(ValueError, match="coefficients must be finite"):
        merge_into(target, [w[0]], [float("inf")])


def test_mergekit_keys_rayalign_does_not_implement_are_refused():
    two = [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}}]
    for extra, match in [
        ({"tokenizer_source": "model:elsewhere"}, r"tokenizer_source 'model:elsewhere' is not supported"),
        ({"tokenizer_source": "base"}, "tokenizer_source 'base' is not supported"),  # there is no base_model
        ({"parameters": {"normalize": True, "int8_mask": True}}, r"\['parameters.int8_mask'\]"),
        ({"models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5}}, two[1]]},
         r"models\[0\].parameters: unsupported \['density'\]"),
        ({"models": [{"model": "a", "parameters": {"weight": "0.5"}}, two[1]]}, r"models.0.weight"),
        ({"models": [{"model": "a", "layer_range": [0, 2]}, two[1]]}, r"models\[0\]: unsupported keys \['layer_range'\]"),
        ({"parameters": {"normalize": "yes"}}, "normalize"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_spec({"merge_method": "linear", "models": two, **extra})
    # sources that are exact because every input shares one tokenizer
    for src in ("union", "model:b"):
        assert parse_spec({"merge_method": "linear", "models": two, "tokenizer_source": src}).method == "linear"
    with pytest.raises(ValueError, match="models.0.weight"):
        parse_spec({"method": "linear", "models": [{"model": "a", "weight": "0.5"}, {"model": "b", "weight": 1}]})
    with pytest.raises(ValueError, match="mu.0"):
        parse_spec({"method": "bone_soup", "models": [{"model": "a"}, {"model": "b"}], "mu": ["1", 0], "beta": 0.7})


def test_corrupt_header_entries_are_named(models, tmp_path):
    import struct

    raw = (models[1] / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = "model.norm.weight"
    for change, match in [(lambda m: m.pop("data_offsets"), f"tensor {name} has no valid data_offsets"),
                          (lambda m: m.update(shape="x"), f"tensor {name} has no valid shape"),
                          (lambda m: m.update(shape=[3]), f"tensor {name} has .* bytes for shape \\[3\\]")]:
        h = json.loads(json.dumps(header))
        change(h[name])
        body = json.dumps(h).encode()
        d = _copy(models[1], tmp_path / f"bad{len(list(tmp_path.iterdir()))}")
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
        with pytest.raises(MergeInputError, match=match):
            Checkpoint(d)


def test_a_killed_merge_leaves_nothing_the_next_one_does_not_clean(models, tmp_path):
    """SIGKILL a merge mid-write: its hidden `.OUT.tmp-PID-*` stays; the next merge to the same output
    removes it (its process is gone) and writes the output."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, cli_env

    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: linear\nmodels:\n  - {{model: {models[1]}, weight: 0.5}}\n"
                   f"  - {{model: {models[2]}, weight: 0.5}}\n")
    out = tmp_path / "out"
    # a stand-in writer that is killed while its temporary directory exists: the CLI's own merge of these
    # tiny models finishes too fast to be caught, so the kill comes inside atomic_dir, as a merge would
    code = ("import sys, time\nfrom rayalign.utils.io import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as tmp:\n    (tmp / 'model.safetensors').write_bytes(b'x' * 100)\n"
            "    print('writing', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and str(proc.pid) in left[0].name and not out.exists()
    t0 = time.monotonic()
    done = run_cli("merge", str(cfg), str(out))
    assert "removed" in done.stderr and left[0].name in done.stderr and time.monotonic() - t0 < 120
    assert out.is_dir() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
