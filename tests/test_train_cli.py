"""`rayalign train` as a user runs it: a fresh interpreter that starts its own local Ray. A SALSA
run is killed (SIGKILL to its whole process group) after its second saved iteration, resumed with
`--resume`, and must continue from the saved step with the same data order."""

import json

import numpy as np
import pytest

from rayalign.recipes.loop import batch_indices
from rayalign.world.build import split_prompts
from tests.conftest import run_cli, run_cli_killed_after_save, run_cli_here

PROMPTS_PER_STEP = 8


def _args(demo, out, *extra: str) -> list[str]:
    sft0, sft1 = demo / "sft" / "sft-0", demo / "sft" / "sft-1"
    return ["train", "salsa", "--config", "salsa", f"policy={sft0}", f"reference.models=[{sft0},{sft1}]",
            f"output={out}", "steps=4", "save_every=2", f"prompts_per_step={PROMPTS_PER_STEP}", "rollout.n=1",
            "rollout.max_new_tokens=16", "learner.actor.micro_batch_size=8", "learner.critic.micro_batch_size=8",
            "learner.actor.warmup_steps=8", *extra]


def test_salsa_killed_mid_run_resumes_from_saved_step(quick_demo, tmp_path):
    out = tmp_path / "salsa"
    killed_at = run_cli_killed_after_save(_args(quick_demo, out), out, 2, tmp_path / "first.log")
    assert killed_at == 2 and not (out / "policy").exists()

    resumed = run_cli(*_args(quick_demo, out), "--resume")
    assert "resuming at iteration 2/4" in resumed.stdout + resumed.stderr
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    n = len(split_prompts(0)["train"])
    expected = [int(batch_indices(n, 0, it, n // PROMPTS_PER_STEP, PROMPTS_PER_STEP)[0]) for it in range(4)]
    assert [int(r["data/first_prompt"]) for r in rows] == expected
    assert len(set(expected)) > 1  # the check would be vacuous if every batch began alike
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 4 and (out / "policy" / "model.safetensors").is_file()
    assert not (out / "state").exists()
    assert np.isfinite([r["kl/sequence"] for r in rows]).all()
    # the actor warms up over its 8 optimiser steps (2 an iteration), across the resume: each row is
    # the mean lr after its two steps, (k + 1) / 8 of 5e-5 after step k (the salsa config's lr)
    expected_lr = [5e-5 * (min(2 * i + 1, 8) + min(2 * i, 8)) / 16 for i in range(1, 5)]
    assert [r["policy/lr"] for r in rows] == pytest.approx(expected_lr)
    assert [r["value/lr"] for r in rows] == pytest.approx([5e-4] * 4)  # no warm-up, constant


def test_salsa_needs_two_reference_models(quick_demo, tmp_path):
    sft0 = quick_demo / "sft" / "sft-0"
    proc = run_cli_here("train", "salsa", "--config", "salsa", f"policy={sft0}", f"reference.models=[{sft0}]",
                   f"output={tmp_path / 'x'}")
    assert proc.returncode == 2
    assert "SALSA needs a soup reference" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_unknown_builtin_config_is_named(tmp_path):
    proc = run_cli_here("train", "ppo", "--config", "nosuch", "policy=x")
    assert proc.returncode != 0
    assert "config file not found: nosuch" in proc.stderr and "salsa" in proc.stderr



def test_critic_free_methods_check_their_samples_per_prompt(quick_demo, tmp_path):
    """`rayalign train rloo` is `algo.estimator=rloo`: one sample per prompt has no baseline, said
    before anything starts; and the method and an explicit other estimator conflict by name."""
    sft0 = quick_demo / "sft" / "sft-0"
    proc = run_cli_here("train", "rloo", "--config", "ppo", f"policy={sft0}", f"output={tmp_path / 'rloo'}",
                   "rollout.n=1")
    assert proc.returncode == 2 and "rollout.n must be >= 2" in proc.stderr and not (tmp_path / "rloo").exists()
    proc = run_cli_here("train", "grpo", "--config", "ppo", f"policy={sft0}", f"output={tmp_path / 'g'}",
                   "algo.estimator=rloo")
    assert proc.returncode == 2 and "rayalign train grpo uses algo.estimator='grpo'" in proc.stderr
    assert not (tmp_path / "g").exists()
