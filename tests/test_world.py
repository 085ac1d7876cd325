"""The synthetic world: gold rewards against hand-computed values, parsing, determinism, labels."""

import random

import numpy as np
import pytest

from rayalign.world import build
from rayalign.world.gold import OBJECTIVES, combine, gold_scores
from rayalign.world.prompts import all_prompts, parse_prompt


def test_gold_scores_hand_computed():
    p = "what colour is the apple ?"
    # key (weight 2) out of 2 + 3 extras; 5 words of 40
    assert gold_scores(p, "the apple is red .") == pytest.approx(
        {"informative": 2 / 5, "concise": 1 - 4 / 40, "friendly": 0.0})
    # key + 1 extra + 1 false claim (penalty 2): (2 + 1 - 2) / 5; friendly 0.5 per distinct phrase
    r = "happy to help ! the apple is red . the apple is sweet . the apple lives in the sea ."
    assert gold_scores(p, r) == pytest.approx(
        {"informative": 1 / 5, "concise": 1 - 17 / 40, "friendly": 0.5})
    # open prompt: all four facts; a repeated friendly phrase counts once, rudeness -1
    about = "tell me about the whale ."
    full = "the whale is blue . the whale is huge . the whale lives in the sea . the whale is slow ."
    assert gold_scores(about, full)["informative"] == pytest.approx(1.0)
    assert gold_scores(about, "great question ! great question ! that is obvious .")["friendly"] == pytest.approx(-0.5)
    # an empty answer is perfectly concise and uninformative; a wrong key is a false claim
    assert gold_scores(p, "") == {"informative": 0.0, "concise": 1.0, "friendly": 0.0}
    assert gold_scores(p, "the apple is blue .")["informative"] == pytest.approx(-2 / 5)
    # facts about another entity are neither informative nor false here
    assert gold_scores(p, "the lemon is yellow .")["informative"] == 0.0


def test_objectives_conflict_at_the_optimum():
    p = "describe the cat ."
    full = " ".join(f + " ." for f in parse_prompt(p).extra)
    friendly = full + " happy to help ! have a nice day !"
    g_full, g_friendly, g_empty = gold_scores(p, full), gold_scores(p, friendly), gold_scores(p, "")
    assert g_full["informative"] > g_empty["informative"] and g_full["concise"] < g_empty["concise"]
    assert g_friendly["friendly"] > g_full["friendly"] and g_friendly["concise"] < g_full["concise"]


def test_prompt_grammar_parses_every_prompt_and_rejects_others():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 24 * 7
    for p in prompts:
        parse_prompt(p)
    with pytest.raises(ValueError, match="not in the synthetic world's grammar: 'what is love"):
        parse_prompt("what is love ?")
    with pytest.raises(ValueError):
        gold_scores("tell me about the unicorn .", "it is white .")


def test_splits_are_disjoint_and_deterministic():
    a, b = build.split_prompts(0), build.split_prompts(0)
    assert a == b
    assert not set(a["train"]) & set(a["test"]) and not set(a["train"]) & set(a["dev"])
    assert build.split_prompts(1)["test"] != a["test"]


def test_datasets_are_deterministic_by_seed_and_mixed_quality():
    prompts = build.split_prompts(0)["train"][:40]
    d1, d2 = build.sft_dataset(prompts, 3, seed=5), build.sft_dataset(prompts, 3, seed=5)
    assert d1.to_list() == d2.to_list()
    assert build.sft_dataset(prompts, 3, seed=6).to_list() != d1.to_list()
    info = [gold_scores(r["prompt"], r["messages"][-1]["content"])["informative"] for r in d1]
    # mediocre on purpose: wrong answers and perfect ones are both present
    assert min(info) < 0 and max(info) == 1.0 and 0.0 < np.mean(info) < 0.6
    row = d1[0]
    assert row["messages"][0] == {"role": "user", "content": row["prompt"]}
    assert row["messages"][1]["role"] == "assistant"


def test_preference_labels_follow_bradley_terry():
    prompts = build.split_prompts(0)["train"]
    w = [0.6, 0.2, 0.2]
    clean = build.preference_dataset(prompts, w, 4, noise=0.0, seed=0)
    assert build.preference_accuracy_ceiling(clean) == 1.0
    noisy = build.preference_dataset(prompts, w, 4, noise=0.3, seed=0)
    agree = build.preference_accuracy_ceiling(noisy)
    assert 0.55 < agree < 0.97  # noise flips some labels, but signal remains
    row = clean[0]
    assert set(row) >= {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    assert combine(np.array(row["gold_chosen"]), w) == pytest.approx(row["score_chosen"])
    # per-objective (one-hot) sets label on that objective alone
    concise = build.preference_dataset(prompts[:50], [0, 1, 0], 2, noise=0.0, seed=0)
    for r in concise:
        assert r["gold_chosen"][1] > r["gold_rejected"][1]


def test_bt_label_probability():
    rng = random.Random(0)
    wins = sum(build.bt_label(1.0, 0.0, 1.0, rng) for _ in range(20000)) / 20000
    assert wins == pytest.approx(1 / (1 + np.exp(-1.0)), abs=0.01)
    assert build.bt_label(0.5, 0.5, 0.0, rng) is None
    with pytest.raises(ValueError, match="weights need 3 entries"):
        build.preference_dataset(["describe the cat ."], [1.0], 1, 0.0, 0)
    assert len(OBJECTIVES) == 3


def test_sft_seeds_can_train_on_their_own_demonstrations():
    """seed_data: shared (one set of rows), subset (a seeded share each) or resample (new samples)."""
    from rayalign.config.schema import SFTConfig
    from rayalign.recipes.supervised import seed_rows

    def texts(rows):
        return [str(r["messages"]) for r in rows]

    shared = SFTConfig(base="b", output="o")
    assert texts(seed_rows(shared, 0)) == texts(seed_rows(shared, 1))
    sub = SFTConfig(base="b", output="o", seed_data="subset", seed_data_fraction=0.5)
    a, b, full = texts(seed_rows(sub, 0)), texts(seed_rows(sub, 1)), texts(seed_rows(shared, 0))
    assert len(a) == len(b) == round(len(full) / 2) and a == texts(seed_rows(sub, 0))  # seeded, repeatable
    assert 0.35 < len(set(a) & set(b)) / len(a) < 0.65  # independent halves overlap by about a half
    res = SFTConfig(base="b", output="o", seed_data="resample")
    r0, r1 = seed_rows(res, 0), seed_rows(res, 1)
    assert sorted(r["prompt"] for r in r0) == sorted(r["prompt"] for r in r1)  # the same prompts ...
    assert len(set(texts(r0)) & set(texts(r1))) < 0.05 * len(r0)  # ... other demonstrations
    with pytest.raises(ValueError, match="seed_data=resample draws new demonstrations from the embedded world"):
        seed_rows(SFTConfig(base="b", output="o", seed_data="resample", data={"source": "x.jsonl"}), 0)
