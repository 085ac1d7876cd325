"""Builds the synthetic world's data sets, deterministically from a seed.

- prompt splits (train / dev / test) over the prompt grammar;
- an unlabelled pre-training corpus (the world's facts in plain text), so that every SFT model
  starts from one shared base;
- mixed-quality SFT demonstrations: sometimes right, sometimes wrong, sometimes verbose,
  friendly or rude, so an SFT model is mediocre and RLHF has room to move it;
- preference pairs labelled by Bradley-Terry sampling on the gold rewards, with a noise knob,
  for one objective or any weighted combination.

Rows have the same schema the real loaders produce (rayalign.data.schema).
"""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
from datasets import Dataset

from rayalign.world.facts import (
    ATTRIBUTES,
    ENTITIES,
    FILLER,
    FRIENDLY,
    RUDE,
    false_facts,
    true_facts,
)
from rayalign.world.gold import OBJECTIVES, combine, gold_vector
from rayalign.world.prompts import Task, all_prompts, parse_prompt

def prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:12]


def split_prompts(seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict[str, list[str]]:
    prompts = all_prompts()
    rng = random.Random(seed)
    rng.shuffle(prompts)
    n_train = int(round(fractions[0] * len(prompts)))
    n_dev = int(round(fractions[1] * len(prompts)))
    return {
        "train": prompts[:n_train],
        "dev": prompts[n_train:n_train + n_dev],
        "test": prompts[n_train + n_dev:],
    }


def _wrong(task: Task, rng: random.Random) -> str:
    """A plausible false claim of the same shape as the key answer."""
    attr = rng.choice(ATTRIBUTES) if task.key is None else next(
        a for a, f in true_facts(task.entity).items() if f == task.key)
    return rng.choice(false_facts(task.entity, attr))


def sample_response(task: Task, rng: random.Random) -> str:
    """One demonstration of mixed quality: the mixture the SFT model imitates."""
    out: list[str] = []
    if rng.random() < 0.35:
        out.append(rng.choice(FRIENDLY) + " !")
    if rng.random() < 0.3:
        out.append(rng.choice(FILLER) + " .")
    if task.key is not None:
        u = rng.random()
        if u < 0.65:
            out.append(task.key + " .")
        elif u < 0.9:
            out.append(_wrong(task, rng) + " .")
    extras = list(task.extra)
    rng.shuffle(extras)
    n_extra = rng.randint(0 if task.key is not None else 1, len(extras))
    for e in extras[:n_extra]:
        if rng.random() < 0.75:
            out.append(e + " .")
        else:
            out.append(_wrong(task, rng) + " .")
    if rng.random() < 0.15:
        out.append(rng.choice(RUDE) + " .")
    if rng.random() < 0.25:
        out.append(rng.choice(FRIENDLY) + " !")
    return " ".join(out)


def _messages(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": prompt}]
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def prompt_dataset(prompts: list[str]) -> Dataset:
    return Dataset.from_list([{"prompt_id": prompt_id(p), "prompt": p} for p in prompts])


def sft_dataset(prompts: list[str], per_prompt: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for p in prompts:
        task = parse_prompt(p)
        for _ in range(per_prompt):
            rows.append({"prompt_id": prompt_id(p), "prompt": p, "messages": _messages(p, sample_response(task, rng))})
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def pretrain_corpus(n_docs: int, seed: int) -> Dataset:
    """Unlabelled encyclopedia-like text: runs of facts about several entities, with a little
    style text. Knowledge needed for held-out prompts comes from here, as it would from a real
    pre-training corpus; staying on the topic of a question, answering in the chat format and
    stopping do not (that is what SFT teaches), so the base model is no assistant."""
    rng = random.Random(seed)
    entities = list(ENTITIES)
    styles = list(FRIENDLY) + list(FILLER)
    docs = []
    for _ in range(n_docs):
        sents: list[str] = []
        for _ in range(rng.randint(2, 4)):
            facts = list(true_facts(rng.choice(entities)).values())
            rng.shuffle(facts)
            sents += [f + " ." for f in facts[: rng.randint(1, 3)]]
        if rng.random() < 0.2:
            sents.insert(rng.randint(0, len(sents)), rng.choice(styles) + " .")
        docs.append({"text": " ".join(sents)})
    return Dataset.from_list(docs)


def bt_label(ra: float, rb: float, noise: float, rng: random.Random) -> bool | None:
    """True if a is preferred. Bradley-Terry: P(a > b) = sigmoid((ra - rb) / noise);
    noise = 0 is the noise-free argmax, and exact ties give no label (None)."""
    if noise <= 0:
        return None if ra == rb else ra > rb
    z = (ra - rb) / noise
    return rng.random() < 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


def preference_dataset(
    prompts: list[str],
    weights: tuple[float, ...] | list[float],
    pairs_per_prompt: int,
    noise: float,
    seed: int,
) -> Dataset:
    """Pairs of demonstrations for one prompt, labelled by BT sampling on the combined gold reward
    (weights over OBJECTIVES; a one-hot vector gives a single-objective set). Rows keep each side's
    gold vector (`gold_chosen` / `gold_rejected`) for multi-objective reward models."""
    if len(weights) != len(OBJECTIVES):
        raise ValueError(f"weights need {len(OBJECTIVES)} entries {OBJECTIVES}, got {list(weights)}")
    rng = random.Random(seed)
    rows = []
    for p in prompts:
        task = parse_prompt(p)
        made = 0
        for _ in range(pairs_per_prompt * 10):
            if made == pairs_per_prompt:
                break
            a, b = sample_response(task, rng), sample_response(task, rng)
            if a == b:
                continue
            va, vb = gold_vector(p, a), gold_vector(p, b)
            label = bt_label(combine(va, weights), combine(vb, weights), noise, rng)
            if label is None:
                continue
            (c, vc), (r, vr) = ((a, va), (b, vb)) if label else ((b, vb), (a, va))
            rows.append({
                "prompt_id": prompt_id(p), "prompt": p,
                "chosen": _messages(p, c), "rejected": _messages(p, r),
                "score_chosen": combine(vc, weights), "score_rejected": combine(vr, weights),
                "gold_chosen": vc.tolist(), "gold_rejected": vr.tolist(),
            })
            made += 1
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def preference_accuracy_ceiling(ds: Dataset) -> float:
    """Share of pairs whose label agrees with the noise-free gold order (1.0 without noise)."""
    return float(np.mean([c > r for c, r in zip(ds["score_chosen"], ds["score_rejected"])]))
