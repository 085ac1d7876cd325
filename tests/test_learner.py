"""The DeepSpeed learner with 2 gloo ranks on CPU: ZeRO-2 and ZeRO-3 must compute the same
training trajectory as one rank without sharding (same global batch, same data)."""

import pytest
import torch

from rayalign.learner.launch import spawn_ranks
from tests.workers import tiny_lm_steps

STEPS, GLOBAL_BATCH = 4, 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "zero0.pt"
    losses = spawn_ranks(tiny_lm_steps, 1, args=(0, STEPS, GLOBAL_BATCH, str(out)))[0]
    return losses, torch.load(out)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_single_rank(stage, reference, tmp_path):
    ref_losses, ref_sd = reference
    out = tmp_path / f"zero{stage}.pt"
    per_rank = spawn_ranks(tiny_lm_steps, 2, args=(stage, STEPS, GLOBAL_BATCH, str(out)))
    # each rank logs the loss of its half of the batch; their mean is the global loss
    mean_losses = [(a + b) / 2 for a, b in zip(*per_rank)]
    assert mean_losses == pytest.approx(ref_losses, rel=1e-4)
    assert ref_losses[-1] < ref_losses[0]  # it trains
    sd = torch.load(out)
    assert sd.keys() == ref_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=1e-4, atol=1e-5, msg=f"ZeRO-{stage} differs at {k}")
