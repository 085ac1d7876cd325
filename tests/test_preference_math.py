"""SPO, DPO and IPO losses against hand-computed values, and SPO's fixed point on a bandit:
with Bradley-Terry preferences from known rewards and beta -> 0, SPO converges to softmax(r/alpha)."""

import pytest
import torch

from rayalign.losses.logprobs import full_kl
from rayalign.config.schema import PrefAlgoConfig
from rayalign.losses.preference import (
    PREFERENCE_LOSSES,
    PairLogprobs,
    dpo_loss,
    global_kl,
    ipo_loss,
    preference_loss,
    sequence_logprob,
    spo_loss,
    spo_weight,
)

W = torch.tensor([-1.0, -2.0])
L = torch.tensor([-2.0, -1.0])


def test_spo_loss_hand_computed():
    # alpha = 2: margins +1 and -1 -> log sigmoid(2) = -0.126928, log sigmoid(-2) = -2.126928
    assert float(spo_loss(W, L, alpha=2.0)) == pytest.approx((0.126928 + 2.126928) / 2 / 2, abs=1e-6)
    # alpha = 1: -(log sigmoid(1) + log sigmoid(-1)) / 2 = (0.313262 + 1.313262) / 2
    assert float(spo_loss(W, L, alpha=1.0)) == pytest.approx(0.813262, abs=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        spo_loss(W, L, alpha=0.0)


def test_spo_weight_is_symmetric_and_down_weights_confident_pairs():
    # p = sigmoid(2) = 0.880797 -> 4 p (1 - p) = 0.419974 for both orders of the pair
    mu = spo_weight(W, L, alpha=2.0, gamma=1.0)
    assert mu.tolist() == pytest.approx([0.419974, 0.419974], abs=1e-6)
    assert spo_weight(W, L, alpha=2.0, gamma=0.0).tolist() == [1.0, 1.0]
    assert float(spo_weight(torch.tensor([0.0]), torch.tensor([0.0]), 1.0, 3.0)) == pytest.approx(1.0)
    weighted = spo_loss(W, L, alpha=2.0, gamma=1.0)
    assert float(weighted) == pytest.approx(0.419974 * 0.563464, abs=1e-6)
    # mu carries no gradient: d/dW of the weighted loss = mu * d/dW of the basic loss
    w1, w2 = W.clone().requires_grad_(), W.clone().requires_grad_()
    spo_loss(w1, L, 2.0, gamma=1.0).backward()
    spo_loss(w2, L, 2.0).backward()
    assert torch.allclose(w1.grad, 0.419974 * w2.grad, atol=1e-6)


def test_dpo_and_ipo_hand_computed():
    ref = torch.tensor([-1.5, -1.5])
    # h = (W - ref) - (L - ref) = [1, -1]; DPO beta = 0.5: -(log sigmoid(0.5) + log sigmoid(-0.5)) / 2
    assert float(dpo_loss(W, L, ref, ref, beta=0.5)) == pytest.approx((0.474077 + 0.974077) / 2, abs=1e-6)
    # IPO tau = 0.5: target 1/(2 tau) = 1 -> ((1 - 1)^2 + (-1 - 1)^2) / 2 = 2
    assert float(ipo_loss(W, L, ref, ref, tau=0.5)) == pytest.approx(2.0)
    # the reference shifts DPO's margin: h = (W - [-0.5, -0.5]) - (L - L) = [-0.5, -1.5]
    # -> -(log sigmoid(-0.5) + log sigmoid(-1.5)) / 2 = (0.974077 + 1.701413) / 2
    assert float(dpo_loss(W, L, torch.tensor([-0.5, -0.5]), L, 1.0)) == pytest.approx(1.337745, abs=1e-6)


def test_preference_loss_registry():
    assert sorted(PREFERENCE_LOSSES) == ["dpo", "ipo", "spo"]
    a = PrefAlgoConfig(alpha=2.0, dpo_beta=0.5, ipo_tau=0.25)
    rw, rl = torch.tensor([-1.5, -1.5]), torch.tensor([-1.5, -1.5])
    spo, dpo, ipo = (preference_loss(n) for n in ("spo", "dpo", "ipo"))
    assert not spo.needs_reference and spo.online_kl and dpo.needs_reference and not dpo.online_kl
    # the registered entries are the pure functions above with the config's parameters
    assert float(spo.fn(PairLogprobs(W, L), a)) == pytest.approx((0.126928 + 2.126928) / 4, abs=1e-6)
    # h = (W - rw) - (L - rl) = W - L = (+1, -1): DPO beta 0.5 -> -(log sigmoid(0.5) + log sigmoid(-0.5)) / 2
    assert float(dpo.fn(PairLogprobs(W, L, rw, rl), a)) == pytest.approx((0.474077 + 0.974077) / 2, abs=1e-6)
    # IPO tau 0.25 -> target 2: ((1 - 2)^2 + (-1 - 2)^2) / 2 = 5
    assert float(ipo.fn(PairLogprobs(W, L, rw, rl), a)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="needs pi_ref's log-probs"):
        dpo.fn(PairLogprobs(W, L), a)
    with pytest.raises(ValueError, match="unknown preference loss 'kto'; registered: dpo, ipo, spo"):
        preference_loss("kto")


def test_sequence_logprob_and_global_kl_use_the_mask():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert sequence_logprob(logp, mask).tolist() == [-5.0, -1.0]
    kl = torch.tensor([[5.0, 0.2, 0.3], [0.1, 0.1, 7.0]])
    assert float(global_kl(kl, mask)) == pytest.approx((0.5 + 0.2) / 2)


def _bandit_fit(alpha: float, gamma: float, beta: float = 1e-4, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Arms with known rewards; every pair of arms labelled by Bradley-Terry sampling; the policy's
    logits minimise SPO's preference loss + beta * KL(pi || pi_ref) (pi_ref uniform)."""
    g = torch.Generator().manual_seed(0)
    r = torch.tensor([1.0, 0.4, 0.0, -0.6, -1.5])
    k = len(r)
    pairs = torch.tensor([(i, j) for i in range(k) for j in range(k) if i < j]).repeat(4000, 1)
    prefer_i = torch.rand(len(pairs), generator=g) < torch.sigmoid(r[pairs[:, 0]] - r[pairs[:, 1]])
    win = torch.where(prefer_i, pairs[:, 0], pairs[:, 1])
    lose = torch.where(prefer_i, pairs[:, 1], pairs[:, 0])
    theta = torch.zeros(k, requires_grad=True)
    ref_logits = torch.zeros(1, 2, k)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        logp = torch.log_softmax(theta, -1)
        kl = global_kl(full_kl(theta.view(1, 1, k).expand(1, 2, k), ref_logits), torch.ones(1, 1))
        loss = spo_loss(logp[win], logp[lose], alpha, gamma) + beta * kl
        opt.zero_grad()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(theta.detach(), -1), torch.softmax(r / alpha, -1)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_spo_converges_to_softmax_of_reward_over_alpha(alpha):
    pi, target = _bandit_fit(alpha, gamma=0.0)
    kl = float((target * (target / pi).log()).sum())
    assert kl < 1e-4, (alpha, pi.tolist(), target.tolist(), kl)  # measured 1.6e-6 to 1.2e-5 (finite labels)
    # alpha controls the entropy: a larger alpha gives a softer policy
    entropy = float(-(pi * pi.log()).sum())
    assert entropy == pytest.approx(float(-(target * target.log()).sum()), abs=0.05)


def test_weighted_spo_keeps_the_fixed_point():
    pi, target = _bandit_fit(1.0, gamma=1.0)
    assert float((target * (target / pi).log()).sum()) < 1e-4  # measured 7.3e-6

