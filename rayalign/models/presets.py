"""A locally trained tokenizer and tiny Llama-architecture presets, saved in Hugging Face format.

The presets load unchanged in transformers, vllm(-cpu) and the merge engine. head_dim is at
least 32 because vLLM's CPU attention needs it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rayalign.utils.io import atomic_dir
from rayalign.world.build import pretrain_corpus, sample_response
from rayalign.world.facts import FILLER, FRIENDLY, RUDE
from rayalign.world.prompts import all_prompts, parse_prompt

SPECIAL = {"bos": "<|bos|>", "eos": "<|end|>", "pad": "<|pad|>", "unk": "<|unk|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

PRESETS: dict[str, dict[str, int]] = {
    # ~0.2M parameters: for tests
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=192),
    # ~1.0M parameters: for the demo (0.38 s per 32x40-token train step on 2 CPU cores)
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=384),
    # ~3.5M parameters: for longer CPU runs (0.83 s per step on 2 cores)
    "medium": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=704),
}
VOCAB_SIZE = 1024
MAX_POSITIONS = 256


def _tokenizer_corpus(seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    texts = list(all_prompts()) + list(FRIENDLY) + list(FILLER) + list(RUDE)
    texts += pretrain_corpus(3000, seed)["text"]
    for p in all_prompts():
        texts.append(sample_response(parse_prompt(p), rng))
    return texts


def train_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the world's text (no download), with a chat template."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = list(SPECIAL.values()) + ROLE_TOKENS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"],
        additional_special_tokens=ROLE_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # for generation; training code pads explicitly
    return fast


def model_config(preset: str, tok: PreTrainedTokenizerFast) -> LlamaConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="float32", **PRESETS[preset],
    )


def build_preset(preset: str, out: str | Path, tok: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """A randomly initialised model of the preset plus the tokenizer, as one HF directory."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(preset, tok))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return Path(out)


def build_presets(out: str | Path, seed: int = 0, which: tuple[str, ...] = tuple(PRESETS)) -> dict[str, Path]:
    out = Path(out)
    tok = train_tokenizer(seed)
    return {name: build_preset(name, out / name, tok, seed) for name in which}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
