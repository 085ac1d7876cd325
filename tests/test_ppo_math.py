"""PPO pieces against values computed by hand (see the comments)."""

import math

import pytest
import torch

from rayalign.losses.ppo import (
    AdaptiveKL, entropy, gae, kl_penalty, masked_whiten, policy_loss, token_rewards, value_loss)


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # log r = log 2
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))  # (1/r - 1) + log r
    # k3 is non-negative and zero only at equality
    x = torch.randn(1000)
    assert (kl_penalty(x, torch.zeros(1000), "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(logp, ref, "k4")


def test_token_rewards_put_score_on_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    r = token_rewards(torch.tensor([1.0, 2.0]), kl, beta=0.5, mask=mask)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]]))


def test_gae_hand_computed():
    # gamma 1, lambda 0.5: deltas (0.1, 0.1, 0.3) -> A2 = 0.3, A1 = 0.1 + 0.5*0.3, A0 = 0.1 + 0.5*A1
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0]]))
    # the episode ends at the last real token: padding's reward and value are ignored
    adv, ret = gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.6, 9.0]]),
                   torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.3, 0.4, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.8, 1.0, 0.0]]))
    # gamma discounts the bootstrap: delta_0 = 0 + 0.9*0.6 - 0.5 with lambda 0
    adv, _ = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 0.9, 0.0)
    assert adv[0, 0].item() == pytest.approx(0.9 * 0.6 - 0.5)


def test_clipped_surrogate_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    loss, m = policy_loss(logp, old, torch.ones(1, 2), mask, clip=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2)  # min(1.5, 1.2), min(0.5, 0.8)
    assert m["clip_fraction"] == pytest.approx(0.5)
    loss, _ = policy_loss(logp, old, -torch.ones(1, 2), mask, clip=0.2)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2)  # min(-1.5, -1.2), min(-0.5, -0.8)
    # gradient flows only through the unclipped side
    logp = logp.clone().requires_grad_()
    policy_loss(logp, old, torch.ones(1, 2), mask, clip=0.2)[0].backward()
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() != 0.0


def test_clipped_value_loss_hand_computed():
    loss, m = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.7 - 2.0) ** 2)  # clipped to 0.7, the larger error
    assert m["value_clip_fraction"] == 1.0


def test_whiten_entropy_and_adaptive_kl():
    w = masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1, 1, 0]]))
    torch.testing.assert_close(w, torch.tensor([[-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0]]), atol=1e-5, rtol=0)
    uniform = torch.zeros(1, 2, 4)
    assert entropy(uniform, torch.ones(1, 2)).item() == pytest.approx(math.log(4))
    ctl = AdaptiveKL(beta=0.1, target=6.0, horizon=10000)
    assert ctl.update(kl=9.0, n_samples=256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))  # error clipped to 0.2
    assert ctl.update(kl=5.7, n_samples=256) < 0.1 * (1 + 0.2 * 256 / 10000)
    fixed = AdaptiveKL(beta=0.05)
    assert fixed.update(100.0, 256) == 0.05
    restored = AdaptiveKL(beta=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.beta == ctl.beta and restored.target == 6.0


def test_running_moments_and_reward_normalisation():
    from rayalign.losses.ppo import RunningMoments, normalise_scores

    m = RunningMoments()
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0])
    m.update(a)
    mean, std = m.update(b)
    allx = torch.cat([a, b]).double()
    assert mean == pytest.approx(float(allx.mean())) and std == pytest.approx(float(allx.std(unbiased=False)))
    s = torch.tensor([0.0, 1.0, 2.0, 3.0])
    # batch: (s - 1.5) / sqrt(1.25)
    assert torch.allclose(normalise_scores(s, "batch"), (s - 1.5) / 1.25**0.5, atol=1e-5)
    assert torch.equal(normalise_scores(s, "none", clip=2.0), torch.tensor([0.0, 1.0, 2.0, 2.0]))
    fresh = RunningMoments()
    assert torch.allclose(normalise_scores(s, "running", fresh), (s - 1.5) / 1.25**0.5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown reward normalisation"):
        normalise_scores(s, "zscore")


def test_kl_hack_monitor_alarms_after_patience_and_resumes_its_state():
    from rayalign.config.schema import MonitorConfig
    from rayalign.recipes.monitor import KLHackMonitor

    mon = KLHackMonitor(MonitorConfig(collapse_ratio=0.5, patience=2, stop_on_collapse=True))
    lengths = [20, 15, 9, 8, 12, 5, 4]  # floor 0.5 * 20 = 10: collapsed at 9, 8 | 5, 4
    alarms = [mon.update(i + 1, x, kl=1.0) for i, x in enumerate(lengths)]
    assert [a.step for a in alarms if a] == [4, 7] and all(a.stop for a in alarms if a)
    assert "below 0.5 x the first step's 20.0" in alarms[3].message
    resumed = KLHackMonitor(MonitorConfig(collapse_ratio=0.5, patience=2))
    resumed.load_state_dict(mon.state_dict())
    assert resumed.update(8, 3, kl=1.0) is not None and resumed.alarms == 3  # the streak carried over


# ---- the advantage estimators (rayalign.losses.advantages), against hand-computed values ------------

def _inputs(scores, groups, mask=None, **kw):
    from rayalign.losses.advantages import AdvantageInputs

    s = torch.tensor(scores, dtype=torch.float32)
    m = torch.ones(len(scores), 2) if mask is None else torch.tensor(mask, dtype=torch.float32)
    return AdvantageInputs(scores=s, token_kl=kw.pop("token_kl", torch.zeros_like(m)), mask=m,
                           groups=torch.tensor(groups), **kw)


def test_group_estimators_on_two_prompts_by_hand():
    from rayalign.losses.advantages import ADVANTAGES

    x = _inputs([1.0, 0.0, 2.0, 4.0], [0, 0, 1, 1])
    s = 0.5 / (0.5 ** 0.5)  # group {1, 0}: mean 0.5, unbiased std sqrt(0.5); group {2, 4}: mean 3, std sqrt(2)
    adv, ret = ADVANTAGES["grpo"].fn(x)
    assert ret is None and adv[:, 0].tolist() == pytest.approx([s, -s, -s, s], abs=1e-5)
    assert torch.equal(adv[:, 0], adv[:, 1])  # the same advantage on every token of a sample
    assert ADVANTAGES["dr_grpo"].fn(x)[0][:, 0].tolist() == pytest.approx([0.5, -0.5, -1.0, 1.0])
    assert ADVANTAGES["rloo"].fn(x)[0][:, 0].tolist() == pytest.approx([1.0, -1.0, -2.0, 2.0])
    three = _inputs([3.0, 0.0, 0.0], [7, 7, 7])  # mean 1, std sqrt((4 + 1 + 1) / 2) = sqrt(3)
    assert ADVANTAGES["grpo"].fn(three)[0][:, 0].tolist() == pytest.approx([2 / 3 ** .5, -1 / 3 ** .5, -1 / 3 ** .5],
                                                                         abs=1e-5)
    assert ADVANTAGES["rloo"].fn(three)[0][:, 0].tolist() == pytest.approx([3.0, -1.5, -1.5])


def test_kl_in_the_reward_and_padding():
    from rayalign.losses.advantages import ADVANTAGES

    kl = torch.tensor([[0.2, 0.4], [0.6, 0.0]])
    x = _inputs([1.0, 0.0], [0, 0], mask=[[1, 1], [1, 0]], token_kl=kl, beta=0.5, kl_in_reward=True)
    adv = ADVANTAGES["dr_grpo"].fn(x)[0]  # r = [1 - 0.5 * (0.2 + 0.4), 0 - 0.5 * 0.6] = [0.7, -0.3]: mean 0.2
    assert adv.flatten().tolist() == pytest.approx([0.5, 0.5, -0.5, 0.0])  # nothing on padding


def test_reinforce_pp_with_baseline_by_hand():
    from statistics import mean, pstdev

    from rayalign.losses.advantages import ADVANTAGES

    kl = torch.tensor([[0.2, 0.4], [0.6, 0.0]])
    x = _inputs([1.0, 0.0], [0, 0], mask=[[1, 1], [1, 0]], token_kl=kl, beta=1.0)
    adv, _ = ADVANTAGES["reinforce_pp"].fn(x)
    # centred scores 0.5, -0.5 on the last tokens; rewards -kl: sample 0 [-0.2, -0.4 + 0.5], sample 1 [-0.6 - 0.5]
    returns = [-0.2 + 0.1, 0.1, -1.1]  # returns-to-go (gamma 1) on the three real tokens
    m, sd = mean(returns), pstdev(returns)
    want = [(r - m) / sd for r in returns]
    assert [adv[0, 0].item(), adv[0, 1].item(), adv[1, 0].item()] == pytest.approx(want, abs=1e-5)
    assert adv[1, 1].item() == 0.0


def test_gae_estimator_is_ppos_and_needs_values():
    from rayalign.losses.advantages import ADVANTAGES, AdvantageInputs, advantage_estimator
    from rayalign.losses.ppo import gae, token_rewards

    m = torch.ones(2, 3)
    kl, v, s = torch.full((2, 3), 0.1), torch.tensor([[0.5, 0.2, 0.1], [0.0, 0.3, 0.4]]), torch.tensor([1.0, -1.0])
    adv, ret = ADVANTAGES["gae"].fn(AdvantageInputs(scores=s, token_kl=kl, mask=m, beta=0.2, values=v, lam=0.9))
    want_adv, want_ret = gae(token_rewards(s, kl, 0.2, m), v, m, 1.0, 0.9)
    assert torch.allclose(adv, want_adv) and torch.allclose(ret, want_ret)
    assert ADVANTAGES["gae"].needs_values and not any(e.needs_values for k, e in ADVANTAGES.items() if k != "gae")
    with pytest.raises(ValueError, match="gae needs the critic"):
        ADVANTAGES["gae"].fn(AdvantageInputs(scores=s, token_kl=kl, mask=m))
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo2'; registered: dr_grpo, gae, grpo"):
        advantage_estimator("ppo2")
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        ADVANTAGES["grpo"].fn(_inputs([1.0, 2.0], [0, 1]))
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        ADVANTAGES["rloo"].fn(_inputs([1.0, 2.0], [0, 1]))


def test_policy_loss_token_sum_divides_by_samples_times_the_constant():
    """Dr. GRPO (arXiv 2503.20783): sum_i sum_t A_it rho_it / (G L) instead of a token mean. With
    rho = 1: sample 0 has 2 tokens with A = 1, sample 1 one token with A = -1 (and padding)."""
    logp = torch.zeros(2, 2)
    adv, mask = torch.tensor([[1.0, 1.0], [-1.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    mean_loss, _ = policy_loss(logp, logp, adv, mask)
    sum_loss, _ = policy_loss(logp, logp, adv, mask, token_sum_norm=4)
    assert mean_loss.item() == pytest.approx(-(1 + 1 - 1) / 3)
    assert sum_loss.item() == pytest.approx(-(1 + 1 - 1) / (2 * 4))


def test_policy_loss_registry_hand_computed():
    """clip is PPO's surrogate; dual_clip (arXiv 1912.09729) bounds negative-advantage tokens below by
    c A; gspo (arXiv 2507.18071) clips one length-normalised ratio per sequence."""
    from rayalign.losses.policy import POLICY_LOSSES, PolicyLossInputs, policy_loss_fn

    assert sorted(POLICY_LOSSES) == ["clip", "dual_clip", "gspo"]
    mask = torch.ones(1, 2)
    logp, old = torch.log(torch.tensor([[5.0, 0.5]])), torch.zeros(1, 2)
    x = PolicyLossInputs(logp, old, -torch.ones(1, 2), mask, clip=0.2, dual_clip=3.0)
    # clip: min(-5, -1.2) = -5 and min(-0.5, -0.8) = -0.8 -> loss (5 + 0.8) / 2
    assert policy_loss_fn("clip").fn(x)[0].item() == pytest.approx((5.0 + 0.8) / 2)
    # dual clip: the first token is bounded by 3 * A = -3 -> loss (3 + 0.8) / 2
    loss, m = policy_loss_fn("dual_clip").fn(x)
    assert loss.item() == pytest.approx((3.0 + 0.8) / 2) and m["dual_clip_fraction"] == pytest.approx(0.5)
    # positive advantages: dual clip is the plain clipped surrogate, min(5, 1.2), min(0.5, 0.8)
    xp = PolicyLossInputs(logp, old, torch.ones(1, 2), mask, clip=0.2)
    assert policy_loss_fn("dual_clip").fn(xp)[0].item() == pytest.approx(-(1.2 + 0.5) / 2)
    # gspo: s = exp(mean(log 5, log 0.5)) = sqrt(2.5) = 1.5811 for A = 1 -> min(1.5811, 1.2) = 1.2;
    # second sequence with ratios 1, 1 and A = -2 (mean of -1, -3): s = 1 -> -2
    g_logp = torch.cat([logp, torch.zeros(1, 2)])
    g = PolicyLossInputs(g_logp, torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [-1.0, -3.0]]), torch.ones(2, 2), clip=0.2)
    loss, m = policy_loss_fn("gspo").fn(g)
    assert loss.item() == pytest.approx(-(1.2 - 2.0) / 2) and m["clip_fraction"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown policy loss 'cispo'; registered: clip, dual_clip, gspo"):
        policy_loss_fn("cispo")


def test_policy_loss_config_names_the_registered_ones():
    from rayalign.config.core import ConfigError, load_config
    from rayalign.config.schema import RLConfig

    cfg = load_config(RLConfig, None, ["policy=p", "output=o", "algo.policy_loss=dual_clip", "algo.dual_clip=2"])
    assert cfg.algo.policy_loss == "dual_clip" and cfg.algo.dual_clip == 2.0
    with pytest.raises(ConfigError, match="unknown policy loss 'ppo2'; registered: clip, dual_clip, gspo"):
        load_config(RLConfig, None, ["policy=p", "output=o", "algo.policy_loss=ppo2"])
