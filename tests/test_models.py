"""Presets and checkpoints: sizes, head_dim for vLLM, and clear errors for bad checkpoints."""

import json
import shutil

import pytest
import torch

from rayalign.models.checkpoint import CheckpointError, load_causal_lm, load_reward_model, save_model
from rayalign.models.presets import PRESETS, model_config, n_params
from rayalign.utils.io import OutputExistsError, atomic_dir


def test_presets_sizes_and_head_dim(tokenizer_and_preset):
    tok, path = tokenizer_and_preset
    model, tok2 = load_causal_lm(path)
    assert n_params(model) < 1_000_000
    assert len(tok2) == len(tok) == model.config.vocab_size
    for name in PRESETS:
        cfg = model_config(name, tok)
        assert cfg.hidden_size // cfg.num_attention_heads >= 32, name
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        model_config("huge", tok)


def test_checkpoint_errors(tokenizer_and_preset, tmp_path):
    tok, path = tokenizer_and_preset
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_causal_lm(tmp_path / "missing")
    no_weights = tmp_path / "noweights"
    shutil.copytree(path, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_causal_lm(no_weights)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(path, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot load model weights from .*corrupt"):
        load_causal_lm(corrupt)
    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(path, bad_cfg)
    (bad_cfg / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load_causal_lm(bad_cfg)


def test_vocabulary_mismatch_is_refused(tokenizer_and_preset, tmp_path):
    tok, path = tokenizer_and_preset
    model, _ = load_causal_lm(path)
    model.resize_token_embeddings(len(tok) - 10)
    save_model(model, tok, tmp_path / "small_vocab")
    with pytest.raises(CheckpointError, match=r"vocabulary mismatch .* tokenizer has \d+ tokens, model embeddings have \d+"):
        load_causal_lm(tmp_path / "small_vocab")


def test_reward_model_head_on_last_token(tokenizer_and_preset):
    tok, path = tokenizer_and_preset
    rm, _ = load_reward_model(path, num_labels=3)
    ids = torch.tensor([tok("<|bos|>a b c", add_special_tokens=False)["input_ids"]])
    padded = torch.cat([ids, torch.full((1, 4), tok.pad_token_id)], dim=1)
    out1 = rm(input_ids=ids).logits
    out2 = rm(input_ids=padded, attention_mask=(padded != tok.pad_token_id).long()).logits
    assert out1.shape == (1, 3)
    torch.testing.assert_close(out1, out2)  # right padding does not move the scored token


def test_atomic_dir_never_leaves_half_written_output(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "part").write_text("x")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("ok")
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_dir(target):
            pass
    assert (target / "f").read_text() == "ok"
    json.dumps({})


def test_top_k_sampling_and_the_expo_papers_dev_sampling(tokenizer_and_preset):
    """top_k = 1 at any temperature is greedy decoding; ExPO searches alpha with its paper's sampling."""
    from rayalign.config.core import load_config
    from rayalign.config.schema import ExpoConfig
    from rayalign.eval.gold import generate

    tok, path = tokenizer_and_preset
    model, _ = load_causal_lm(path)
    prompts = ["what colour is the apple ?", "where does the fox live ?"]
    greedy = generate(model, tok, prompts, n=1, max_new_tokens=8, temperature=0.0)
    assert generate(model, tok, prompts, n=2, max_new_tokens=8, temperature=1.5, top_k=1, seed=3) == \
        [g * 2 for g in greedy]
    assert generate(model, tok, prompts, n=2, max_new_tokens=8, temperature=1.5, seed=3) != [g * 2 for g in greedy]
    dev = load_config(ExpoConfig, None, ["sft=a", "aligned=b", "output=o", "reward.kind=gold"]).dev
    assert (dev.temperature, dev.top_p, dev.top_k) == (0.7, 0.9, 40)
