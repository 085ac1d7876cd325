"""SPO, DPO and IPO on a real local Ray (num_cpus=2): 2 learner ranks (ZeRO-2) holding the policy
and a soup pi_ref, a vLLM rollout worker drawing SPO's online samples and killed mid-run, and
`rayalign train spo` killed and resumed from its saved step with the same pairs and samples."""

import json
import math

import pytest
import ray
from pydantic import ValidationError
from safetensors.torch import load_file

from rayalign.config.schema import PrefConfig
from rayalign.recipes.loop import batch_indices
from tests.conftest import run_cli, run_cli_killed_after_save, run_cli_here


def _cfg(demo, out, **over):
    sft0, sft1 = str(demo / "sft" / "sft-0"), str(demo / "sft" / "sft-1")
    cfg = {"policy": sft0, "output": str(out), "data": {"limit": 64}, "pairs_per_step": 16, "save_every": 0,
           "reference": {"models": [sft0, sft1]},
           "rollout": {"max_new_tokens": 16, "n": 2, "resources": {"num_cpus": 0.25}},
           "learner": {"ranks": 2, "resources": {"num_cpus": 0.5}, "actor": {"zero_stage": 2, "micro_batch_size": 8}},
           "algo": {"kl_every": 2, "kl_prompts": 8, "kl_coef": 0.1}, "sync": {"kind": "object_store"}}
    cfg.update(over)
    return PrefConfig.model_validate(cfg)


def _rows(out):
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_spo_with_soup_reference_survives_a_killed_rollout_worker(quick_demo, local_ray, tmp_path):
    from rayalign.recipes.preference import run_preference

    killed = []

    def kill_after_first(step, metrics, fleet):
        if step == 1:
            ray.kill(fleet.pool.actors[0], no_restart=False)
            killed.append(step)

    out = tmp_path / "spo"
    policy = run_preference(_cfg(quick_demo, out), "spo", on_step=kill_after_first)
    rows = _rows(out)
    assert killed == [1] and [r["step"] for r in rows] == [1, 2, 3, 4]
    # samples refreshed every kl_every = 2 steps, from the current policy, and the KL term is in every step
    assert [r.get("kl/refreshed", 0.0) for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert all(r["global_kl"] >= 0 and "sample_entropy" in r for r in rows)
    assert rows[0]["global_kl"] < rows[-1]["global_kl"]  # the policy moves away from the soup
    assert rows[-1]["restarts"] == 1 and "gold/online_combined" in rows[2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["restarts"] == 1 and 0 < summary["kl_time_share"] < 1
    trained = load_file(str(policy / "model.safetensors"))
    start = load_file(str(quick_demo / "sft" / "sft-0" / "model.safetensors"))
    assert any(not (trained[k] == start[k]).all() for k in start)
    assert not (out / "state").exists()


def test_dpo_and_ipo_share_the_data_path_and_start_at_their_known_losses(quick_demo, local_ray, tmp_path):
    """With pi = pi_ref at the start every log-ratio is 0: DPO's first loss is log 2 and IPO's is
    (1 / (2 tau))^2. Neither method starts a rollout worker."""
    from rayalign.recipes.preference import run_preference

    for method, first in (("dpo", math.log(2)), ("ipo", (1 / (2 * 0.25)) ** 2)):
        out = tmp_path / method
        cfg = _cfg(quick_demo, out, reference={"models": []}, algo={"ipo_tau": 0.25, "dpo_beta": 0.5})
        run_preference(cfg, method)
        rows = _rows(out)
        assert len(rows) == 4 and rows[0]["preference_loss"] == pytest.approx(first, rel=1e-4)
        assert "implicit_accuracy" in rows[-1] and "global_kl" not in rows[-1] and "kl/refreshed" not in rows[0]
        assert json.loads((out / "summary.json").read_text())["engine"] is None


def test_preference_config_errors_name_the_key(quick_demo, tmp_path):
    with pytest.raises(ValidationError, match="rollout.temperature and rollout.top_p must be 1.0"):
        _cfg(quick_demo, tmp_path, rollout={"temperature": 0.7})
    with pytest.raises(ValidationError, match="pairs_per_step = 12 is not a multiple"):
        _cfg(quick_demo, tmp_path, pairs_per_step=12)
    with pytest.raises(ValidationError, match="alpha"):
        _cfg(quick_demo, tmp_path, algo={"alpha": 0})
    proc = run_cli_here("train", "spo", "--config", "spo", f"policy={tmp_path / 'missing'}", f"output={tmp_path / 'o'}")
    assert proc.returncode == 2 and "policy" in proc.stderr and not (tmp_path / "o").exists()


def _args(demo, out):
    sft0 = demo / "sft" / "sft-0"
    return ["train", "spo", "--config", "spo", f"policy={sft0}", f"output={out}", "data.limit=96",
            "pairs_per_step=16", "save_every=2", "algo.kl_every=4", "algo.kl_prompts=8", "rollout.max_new_tokens=16",
            "learner.actor.micro_batch_size=8", "learner.actor.warmup_steps=4"]


def test_spo_killed_mid_run_resumes_with_the_same_pairs_and_samples(quick_demo, tmp_path):
    out = tmp_path / "spo"
    killed_at = run_cli_killed_after_save(_args(quick_demo, out), out, 2, tmp_path / "first.log")
    assert killed_at in (2, 4) and not (out / "policy").exists()
    resumed = run_cli(*_args(quick_demo, out), "--resume")
    assert f"resuming at step {killed_at}/6" in resumed.stdout + resumed.stderr
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    n_pairs = 96
    expected = [int(batch_indices(n_pairs, 0, s, n_pairs // 16, 16)[0]) for s in range(6)]
    assert [int(r["data/first_pair"]) for r in rows] == expected and len(set(expected)) > 1
    # steps 3 and 4 continue the refresh cycle begun at step 1 with its saved samples; step 5 refreshes
    assert [r.get("kl/refreshed", 0.0) for r in rows] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    # 4 steps of warm-up to the spo config's lr 3e-4, then constant, across the resume
    assert [r["lr"] for r in rows] == pytest.approx([3e-4 * min(k + 1, 4) / 4 for k in range(1, 7)])
    assert (out / "policy" / "model.safetensors").is_file() and not (out / "state").exists()
