"""Multi-objective evaluation against hand-computed values: preference grids, non-domination,
hypervolume, controllability; preference conditioning (Prompted-MORL); the soups' PPO run plan."""

import numpy as np
import pytest

from rayalign.config.core import ConfigError, load_config
from rayalign.config.schema import RLConfig, SoupsConfig
from rayalign.eval.pareto import controllability, hypervolume, non_dominated, preference_grid
from rayalign.merge.coefficients import bone_matrix
from rayalign.recipes.soups import training_runs, win_rate_at
from rayalign.reward.conditioning import INSTRUCTIONS, PreferenceConditioning, binary_grid, preference_message
from rayalign.reward.scorer import RewardScorer


def test_preference_grids():
    g2 = preference_grid(2, 11)
    assert g2.shape == (11, 2)
    assert np.allclose(g2[:, 0], np.linspace(0, 1, 11)) and np.allclose(g2.sum(1), 1)
    g3 = preference_grid(3, 6)  # steps of 0.2 on the 3-simplex: C(5 + 2, 2) = 21 points
    assert g3.shape == (21, 3) and np.allclose(g3.sum(1), 1) and (g3 >= 0).all()
    assert len({tuple(r) for r in np.round(g3, 6)}) == 21
    assert preference_grid(3, 11).shape == (66, 3)
    with pytest.raises(ValueError, match="at least 2 objectives"):
        preference_grid(1)


def test_non_dominated_and_hypervolume_by_hand():
    f = np.array([[1.0, 0.0], [0.5, 0.5], [0.4, 0.4], [0.0, 1.0], [0.5, 0.5]])
    assert non_dominated(f).tolist() == [True, True, False, True, True]  # duplicates do not dominate each other
    # staircase against (0, 0): (0.9,0.1),(0.5,0.5),(0.1,0.9) -> 0.9*0.1 + 0.5*0.4 + 0.1*0.4 = 0.33
    stairs = np.array([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])
    assert hypervolume(stairs, [0, 0]) == pytest.approx(0.33)
    # dominated points add nothing; points not strictly above the reference are dropped
    assert hypervolume(np.vstack([stairs, [[0.3, 0.3], [2.0, 0.0]]]), [0, 0]) == pytest.approx(0.33)
    assert hypervolume(stairs, [-1, -1]) == pytest.approx(1.9 * 1.1 + 1.5 * 0.4 + 1.1 * 0.4)
    assert hypervolume(np.array([[-0.5, -0.5]]), [0, 0]) == 0.0
    # 3 objectives: two boxes [0,1]x[0,1]x[0,2] and [0,2]x[0,1]x[0,1] overlap in the unit cube: 2 + 2 - 1
    assert hypervolume(np.array([[1.0, 1.0, 2.0], [2.0, 1.0, 1.0]]), [0, 0, 0]) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="does not match a reference point"):
        hypervolume(stairs, [0, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        hypervolume(np.array([[np.nan, 1.0]]), [0, 0])


def test_hypervolume_matches_a_monte_carlo_estimate():
    rng = np.random.default_rng(0)
    front = rng.uniform(0, 1, size=(12, 3))
    samples = rng.uniform(0, 1, size=(200_000, 3))
    covered = np.zeros(len(samples), dtype=bool)
    for p in front:
        covered |= np.all(samples <= p, axis=1)
    assert hypervolume(front, [0, 0, 0]) == pytest.approx(covered.mean(), abs=0.005)


def test_controllability_is_spearman_per_objective():
    grid = preference_grid(2, 11)
    rising = np.stack([grid[:, 0] ** 3, 1 - grid[:, 0]], axis=1)  # monotone in mu on both objectives
    c = controllability(grid, rising, ["informative", "concise"])
    assert c["per_objective"] == {"informative": pytest.approx(1.0), "concise": pytest.approx(1.0)}
    backwards = rising[::-1]
    assert controllability(grid, backwards)["mean"] == pytest.approx(-1.0)
    flat = np.ones_like(rising)
    assert np.isnan(controllability(grid, flat)["mean"])
    with pytest.raises(ValueError, match="differ in shape"):
        controllability(grid, rising[:5])


def test_win_rate_at_weights_the_objectives_by_mu():
    a = np.array([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])  # [P=2, n=1, K=3]
    b = np.array([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]])
    assert win_rate_at(a, b, np.array([1.0, 0.0, 0.0])) == 0.75  # one win, one tie
    assert win_rate_at(a, b, np.array([0.0, 1.0, 0.0])) == 0.25


def test_preference_conditioning():
    cond = PreferenceConditioning(["informative", "concise", "friendly"], ["informative", "concise"], 11)
    mu = cond.sample(np.random.default_rng(0), 50)
    assert mu.shape == (50, 2) and np.allclose(mu.sum(1), 1)
    assert {round(x, 1) for x in mu[:, 0]} <= {round(x, 1) for x in np.linspace(0, 1, 11)}
    assert cond.weights(np.array([[0.3, 0.7]])).tolist() == [[0.3, 0.7, 0.0]]
    msgs = cond.messages("what colour is the apple ?", [0.3, 0.7])
    assert msgs[0] == {"role": "system", "content": "preference: informative 0.30, concise 0.70"}
    assert msgs[1]["content"] == "what colour is the apple ?"
    assert preference_message(["a", "b"], [1, 0]) == "preference: a 1.00, b 0.00"
    # the paper's style: one instruction per objective asked for, mu uniform over a non-empty subset
    paper = PreferenceConditioning(["informative", "concise", "friendly"], ["informative", "concise"], 11,
                                   "instructions")
    assert paper.grid.tolist() == [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]
    assert set(map(tuple, paper.sample(np.random.default_rng(0), 40).tolist())) == {(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)}
    assert paper.messages("q ?", [1.0, 0.0])[0]["content"] == INSTRUCTIONS["informative"]
    assert paper.messages("q ?", [0.5, 0.5])[0]["content"] == f"{INSTRUCTIONS['informative']} {INSTRUCTIONS['concise']}"
    # a preference off the training set is asked for with the nearest one (L1): 0.8/0.2 -> informative alone
    assert paper.nearest([0.8, 0.2]).tolist() == [1.0, 0.0] and paper.nearest([0.6, 0.4]).tolist() == [0.5, 0.5]
    assert paper.messages("q ?", [0.2, 0.8])[0]["content"] == INSTRUCTIONS["concise"]
    assert cond.nearest([0.3, 0.7]).tolist() == [0.3, 0.7]  # the weights style asks for mu itself
    assert binary_grid(3).shape == (7, 3) and np.allclose(binary_grid(3).sum(1), 1)
    with pytest.raises(ValueError, match="style 'poetry'"):
        PreferenceConditioning(["informative", "concise"], None, 11, "poetry")
    with pytest.raises(ValueError, match=r"\['kind'\] are not objectives of the reward scorer"):
        PreferenceConditioning(["informative", "concise"], ["informative", "kind"], 11)
    with pytest.raises(ValueError, match="at least 2 objectives"):
        PreferenceConditioning(["reward"], None, 11)


def test_soups_plan_their_ppo_runs_from_the_math():
    cfg = SoupsConfig(policy="sft", output="out", objectives=["informative", "concise"], bone_beta=0.7)
    runs = training_runs(cfg)
    assert list(runs) == ["expert-informative", "expert-concise", "backbone-0", "backbone-1", "morl"]
    assert runs["expert-concise"] == ["reward.weights=[0.0, 1.0, 0.0]"]
    B = bone_matrix(2, 0.7)
    assert runs["backbone-0"] == ["reward.weights=[0.7, 0.3, 0.0]"] and np.allclose(B[0], [0.7, 0.3])
    # every plan is a valid RL config (the overrides parse)
    for overrides in runs.values():
        rl = load_config(RLConfig, "ppo", ["policy=sft", "output=o", *overrides])
        assert len(rl.reward.weights) == 3
    morl = load_config(RLConfig, "ppo", ["policy=sft", "output=o", *runs["morl"]])
    assert morl.reward.conditioning == "prompt" and morl.reward.conditioned_objectives == ["informative", "concise"]
    # the paper's prompts, and the PPO budget of a two-expert soup (2 x the experts' steps)
    assert morl.reward.condition_style == "instructions" and morl.steps == 2 * load_config(RLConfig, "ppo", [
        "policy=sft", "output=o"]).steps
    short = training_runs(SoupsConfig(policy="sft", output="o", rl=["steps=7"], morl_budget="single",
                                      morl_prompts="weights"))
    assert "steps=7" not in short["morl"] and "reward.condition_style=weights" in short["morl"]
    assert "steps=14" in training_runs(SoupsConfig(policy="sft", output="o", rl=["steps=7"]))["morl"]
    three = training_runs(SoupsConfig(policy="sft", output="o", objectives=["informative", "concise", "friendly"],
                                      methods=["bone"], bone_beta=0.6))
    assert three["backbone-2"] == ["reward.weights=[0.2, 0.2, 0.6]"]


def test_soups_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="objectives"):
        load_config(SoupsConfig, None, ["policy=a", "output=b", "objectives=[informative,kindness]"])
    with pytest.raises(ConfigError, match="bone_beta"):
        load_config(SoupsConfig, None, ["policy=a", "output=b", "bone_beta=0.4"])
    with pytest.raises(ConfigError, match="bone_k"):
        load_config(SoupsConfig, None, ["policy=a", "output=b", "bone_k=[0.5]"])
    with pytest.raises(ConfigError, match="rewarded_k"):
        load_config(SoupsConfig, None, ["policy=a", "output=b", "rewarded_k=[1.0,0.9]"])
    with pytest.raises(ConfigError, match="morl_prompts"):
        load_config(SoupsConfig, None, ["policy=a", "output=b", "morl_prompts=decimals"])
    with pytest.raises(ConfigError, match="reference_point"):
        load_config(SoupsConfig, None, ["policy=a", "output=b", "reference_point=[0,0,0]"])
    with pytest.raises(ConfigError, match="methods"):
        load_config(SoupsConfig, None, ["policy=a", "output=b", "methods=[rewarded,magic]"])


def test_fronts_over_a_three_objective_simplex(quick_demo, tmp_path):
    """The front evaluation with real (tiny) models standing in for the experts and backbones: a
    3-objective simplex grid, hypervolume of each front, Bone Soup's k chosen on dev."""
    from rayalign.eval.merged import rollout_scores
    from rayalign.models.checkpoint import load_causal_lm
    from rayalign.recipes.soups import FrontEvaluator, evaluate_fronts

    d = quick_demo
    models = [d / "sft/sft-0", d / "sft/sft-1", d / "ppo/policy"]
    objs = ["informative", "concise", "friendly"]
    policies = {f"expert-{o}": m for o, m in zip(objs, models)} | {f"backbone-{j}": m for j, m in enumerate(models)} \
        | {"morl": d / "spo/policy"}
    cfg = load_config(SoupsConfig, None, [f"policy={d / 'sft/sft-0'}", f"output={tmp_path}",
                                          "objectives=[informative,concise,friendly]", "grid_points=3",
                                          "bone_k=[1.0,1.5]", "test.prompts.limit=3", "test.samples_per_prompt=2",
                                          "test.max_new_tokens=8", "dev.prompts.limit=2", "dev.samples_per_prompt=1",
                                          "dev.max_new_tokens=8"])
    r = evaluate_fronts(cfg, policies, tmp_path)
    assert np.allclose(r["grid"], preference_grid(3, 3)) and len(r["grid"]) == 6
    assert set(r["methods"]) == {"rewarded", "bone", "personalized", "morl"}
    for m, v in r["methods"].items():
        front = np.asarray(v["front"])
        assert front.shape == (6, 3)
        assert v["hypervolume"] == pytest.approx(hypervolume(front, [-0.1] * 3)), m
        assert set(v["controllability"]["per_objective"]) == set(objs)
    assert r["chosen"]["bone_k"] in (1.0, 1.5) and set(r["chosen"]["bone_dev_hypervolume"]) == {"1.0", "1.5"}
    # Rewarded Soups get the same extrapolation candidates; both soups are also reported at k = 1
    assert r["chosen"]["rewarded_k"] in (1.0, 1.5) and set(r["chosen"]["rewarded_dev_hypervolume"]) == {"1.0", "1.5"}
    assert set(r["at_k1"]) == {"rewarded", "bone"} and "bone vs rewarded, both at k = 1" in r["pairwise"]
    saved = np.load(tmp_path / "scores.npz")
    for m in ("rewarded", "bone"):
        if r["chosen"][f"{m}_k"] == 1.0:
            np.testing.assert_array_equal(saved[m], saved[f"{m}_k1"])
    assert len(r["objective_std_sft"]) == 3
    # at a vertex of the simplex the Rewarded Soup (k = 1) is that expert itself: same weights, same samples
    vertex = [i for i, mu in enumerate(r["grid"]) if mu == [0.0, 0.0, 1.0]][0]
    model, tok = load_causal_lm(models[2])
    alone = rollout_scores(model, tok, FrontEvaluator(cfg, "test").prompts, RewardScorer("gold"), n=2,
                           max_new_tokens=8, seed=cfg.seed)
    np.testing.assert_allclose(saved["rewarded_k1"][vertex], alone, atol=1e-9)
    # and the personalized front, sharing those experts without a reward model, is that same front
    np.testing.assert_array_equal(saved["personalized"], saved["rewarded_k1"])
    assert (tmp_path / "fronts.png").stat().st_size > 0 and (tmp_path / "controllability.png").is_file()


def test_personalized_soups_learn_from_a_reward_model_head_each(tmp_path):
    import json

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps({"id2label": {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}}))
    runs = training_runs(SoupsConfig(policy="sft", output="o", methods=["personalized"],
                                     personalized_reward_model=str(rm)))
    assert list(runs) == ["personal-informative", "personal-concise"]
    assert runs["personal-concise"] == ["reward.kind=model", f"reward.model={rm}", "reward.weights=[0.0, 1.0, 0.0]",
                                        "critic=sft"]
    (rm / "config.json").write_text(json.dumps({"num_labels": 1}))
    with pytest.raises(ValueError, match="has one head; Personalized Soups need one head per objective"):
        training_runs(SoupsConfig(policy="sft", output="o", personalized_reward_model=str(rm)))
