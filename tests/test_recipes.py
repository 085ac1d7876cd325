"""Pre-train -> SFT seeds -> soup -> reward model through the real CLI, plus resume and output safety."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from rayalign.recipes.loop import batch_indices
from tests.conftest import ROOT, run_cli, run_cli_here


def test_quick_demo_writes_every_stage_and_report(quick_demo):
    for d in ("presets/tiny", "base/model", "sft/sft-0", "sft/sft-1", "soup", "rm/model"):
        assert (quick_demo / d / "model.safetensors").is_file(), d
        assert (quick_demo / d / "tokenizer.json").is_file(), d
    results = json.loads((quick_demo / "results.json").read_text())
    aligned = ("ppo", "salsa", "spo", "dpo")
    assert set(results["gold"]) == {"random-init", "base", "sft-0", "sft-1", "soup", *aligned,
                                    *(f"{m}+expo" for m in aligned)}
    assert set(results["rl"]) == {"ppo", "salsa"} and "salsa vs ppo" in results["win_rate"]
    for m in ("ppo", "salsa"):
        assert results["rl"][m]["iterations"] == 3 and results["rl"][m]["engine"] == "vllm"
        assert (quick_demo / m / "policy" / "model.safetensors").is_file()
        assert (quick_demo / m / "logs" / "metrics.jsonl").is_file()
    for g in results["gold"].values():
        assert {"informative", "concise", "friendly", "combined", "informative_se"} <= set(g)
    assert 0.0 <= results["reward_model"]["heldout_accuracy"]["all"] <= 1.0
    report = (quick_demo / "report.md").read_text()
    assert "| sft-0 |" in report and "Held-out pair accuracy" in report
    assert "## PPO and SALSA" in report
    gold = "the gold objectives (informative, concise, friendly), weighted [0.6, 0.2, 0.2]"
    assert f"| salsa (vllm) | {gold} | sft-0 + sft-1 | 3 |" in report and f"| ppo (vllm) | {gold} | sft-0 | 3 |" in report
    assert "They optimise no reward: their loss is on preference pairs (world preference pairs" in report
    assert "- backbone-0: reward.weights=[0.7, 0.3, 0.0]" in report  # Bone backbone j on h_j = (B r)_j
    assert "![gold rewards](gold_rewards.png)" in report
    # SPO (online global KL) and DPO stages
    assert set(results["preference"]) == {"spo", "dpo"} and "spo vs dpo" in results["win_rate"]
    assert results["preference"]["spo"]["steps"] == 2 and "global_kl" in results["preference"]["spo"]["last"]
    assert results["preference"]["dpo"]["kl_time_share"] is None
    assert "## SPO and DPO" in report and "| spo | 2 x 16 |" in report
    assert (quick_demo / "gold_rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # ExPO of every aligned model: alpha from the grid, chosen by the reward model on dev rollouts
    assert set(results["expo"]) == set(aligned)
    for m, v in results["expo"].items():
        assert v["alpha"] in (0.0, 0.5) and [p["alpha"] for p in v["curve"]] == [0.0, 0.5]
        assert (quick_demo / "expo" / m / "model" / "model.safetensors").is_file()
        assert f"{m}+expo vs {m}" in results["win_rate"]
    assert "## ExPO" in report and "![ExPO: reward against alpha](expo_alpha.png)" in report
    # soups: every method's front over the 3-point grid, hypervolume and controllability
    soups = results["soups"]
    assert set(soups["methods"]) == {"rewarded", "bone", "personalized", "morl"}
    for m, v in soups["methods"].items():
        assert np.asarray(v["front"]).shape == (3, 2) and v["hypervolume"] >= 0, m
        assert set(v["controllability"]["per_objective"]) == {"informative", "concise"}
    assert soups["chosen"]["bone_k"] in (1.0, 1.2) and soups["chosen"]["rewarded_k"] in (1.0, 1.2)
    assert soups["shared_experts"] and set(soups["at_k1"]) == {"rewarded", "bone"}
    for run in ("expert-informative", "expert-concise", "backbone-0", "backbone-1", "morl"):
        assert (quick_demo / "soups" / "runs" / run / "policy" / "model.safetensors").is_file(), run
    morl_config = (quick_demo / "soups" / "runs" / "morl" / "config.yaml").read_text()
    assert "conditioning: prompt" in morl_config and "condition_style: instructions" in morl_config
    assert "\nsteps: 4\n" in morl_config  # the PPO steps of both experts (2 each)
    # no GPU here: every RL learner and reference of the demo computes on all of the machine's cores
    from rayalign.config.core import load_config
    from rayalign.config.schema import PrefConfig, RLConfig

    cores = len(os.sched_getaffinity(0))
    for run in ("ppo", "salsa", "soups/runs/morl"):
        rl = load_config(RLConfig, quick_demo / run / "config.yaml")
        assert rl.learner.resources.cpu_threads == rl.reference.resources.cpu_threads == cores, run
        assert rl.rollout.resources.cpu_threads is None, run
    assert load_config(PrefConfig, quick_demo / "spo" / "config.yaml").learner.resources.cpu_threads == cores
    assert "## Soups over preferences: informative vs concise" in report and "| Bone Soups |" in report
    assert (quick_demo / "soups" / "fronts.png").read_bytes()[:4] == b"\x89PNG"
    # a `rayalign serve` config over the demo's soups
    from rayalign.config.schema import ServeConfig

    serve_cfg = load_config(ServeConfig, quick_demo / "serve.yaml")
    assert [f.name for f in serve_cfg.families] == ["demo-soup", "demo-bone"]
    assert serve_cfg.families[1].k == soups["chosen"]["bone_k"]
    assert serve_cfg.families[0].k == soups["chosen"]["rewarded_k"]
    # resolved configs are saved; no temporary or resume state is left behind
    assert (quick_demo / "sft" / "config.yaml").is_file() and (quick_demo / "rm" / "config.yaml").is_file()
    leftovers = [p for p in quick_demo.rglob("*") if ".tmp-" in p.name or p.name == "state"]
    assert leftovers == []
    assert (quick_demo / "base" / "logs" / "metrics.jsonl").is_file()
    assert any((quick_demo / "base" / "logs" / "tensorboard").iterdir())


def test_sft_seeds_differ_and_soup_is_their_average(quick_demo):
    a = load_file(str(quick_demo / "sft/sft-0/model.safetensors"))
    b = load_file(str(quick_demo / "sft/sft-1/model.safetensors"))
    soup = load_file(str(quick_demo / "soup/model.safetensors"))
    base = load_file(str(quick_demo / "base/model/model.safetensors"))
    k = "model.layers.0.mlp.up_proj.weight"
    assert not np.allclose(a[k], b[k]) and not np.allclose(a[k], base[k])
    for name in a:
        np.testing.assert_allclose(soup[name], (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-7)


def test_demo_refuses_existing_run_and_resume_finishes_without_retraining(quick_demo):
    proc = run_cli_here("demo", "--quick", "--out", str(quick_demo))
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--resume" in proc.stderr
    before = (quick_demo / "sft/sft-0/model.safetensors").stat().st_mtime
    run_cli("demo", "--quick", "--out", str(quick_demo), "--resume")
    assert (quick_demo / "sft/sft-0/model.safetensors").stat().st_mtime == before


def test_batch_order_is_a_function_of_seed_and_step():
    a = [batch_indices(100, 7, s, 10, 10).tolist() for s in range(20)]
    assert a == [batch_indices(100, 7, s, 10, 10).tolist() for s in range(20)]
    assert sorted(sum(a[:10], [])) == list(range(100))  # one epoch covers every example once
    assert a[:10] != a[10:]  # epochs are reshuffled


def _sft_args(base, out):
    return ["sft", f"base={base}", f"output={out}", "seeds=[3]", "epochs=3", "save_every=5",
            "world.sft_per_prompt=2", "learner.micro_batch_size=16"]


def test_sft_killed_midway_resumes_to_identical_weights(quick_demo, tmp_path):
    base = quick_demo / "base" / "model"
    run_cli_here(*_sft_args(base, tmp_path / "straight"), check=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rayalign.cli", *_sft_args(base, killed)], cwd=ROOT,
                            env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "state" / "sft-3" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), "no resumable state was written before the kill"
    saved_step = int(latest.read_text().strip().removeprefix("step"))
    assert not (killed / "sft-3").exists()
    proc = run_cli_here(*_sft_args(base, killed))
    assert proc.returncode == 2 and "already exists" in proc.stderr  # no silent overwrite
    run_cli_here(*_sft_args(base, killed), "--resume", check=True)
    steps = [json.loads(line)["step"] for line in (killed / "logs/sft-3/metrics.jsonl").read_text().splitlines()]
    resumed_from = steps.index(saved_step + 1, saved_step)  # the resumed run continues at the saved step
    assert steps[resumed_from - 1] >= saved_step
    a = load_file(str(tmp_path / "straight/sft-3/model.safetensors"))
    b = load_file(str(killed / "sft-3/model.safetensors"))
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_cli_errors_are_clear_and_write_nothing(tmp_path):
    out = tmp_path / "never"
    proc = run_cli_here("sft", "base=x", f"output={out}", "learner.lrr=1")
    assert proc.returncode == 2 and "unknown key 'learner.lrr'" in proc.stderr
    proc = run_cli_here("sft", f"base={tmp_path / 'missing'}", f"output={out}")
    assert proc.returncode == 2 and "model directory not found" in proc.stderr
    proc = run_cli_here("sft")
    assert proc.returncode == 2 and "base" in proc.stderr and "Field required" in proc.stderr
    assert not out.exists()
    help_text = run_cli_here("--help").stdout
    for cmd in ("demo", "presets", "world", "pretrain", "sft", "rm", "eval"):
        assert cmd in help_text


def test_world_export_and_real_loader_roundtrip(tmp_path):
    from rayalign.data.loaders import load_rows

    run_cli_here("world", str(tmp_path / "w"), check=True)
    prefs = load_rows(str(tmp_path / "w" / "prefs_train.jsonl"), "preference")
    sft = load_rows(str(tmp_path / "w" / "sft_test.jsonl"), "sft")
    assert len(prefs) > 100 and len(sft) > 100
    assert run_cli_here("world", str(tmp_path / "w")).returncode == 2


def test_presets_pretrain_and_eval_commands(quick_demo, tmp_path):
    run_cli_here("presets", str(tmp_path / "presets"), check=True)
    for name in ("tiny", "small", "medium"):
        assert (tmp_path / "presets" / name / "model.safetensors").is_file()
    assert run_cli_here("presets", str(tmp_path / "presets")).returncode == 2  # never overwritten
    run_cli_here("pretrain", f"model={tmp_path / 'presets' / 'tiny'}", f"output={tmp_path / 'base'}",
                 "world.pretrain_docs=300", "learner.micro_batch_size=16", "save_every=0", check=True)
    assert (tmp_path / "base" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "base" / "config.yaml").is_file() and not (tmp_path / "base" / "state").exists()
    proc = run_cli_here("eval", f"models=[{quick_demo / 'sft' / 'sft-0'},{tmp_path / 'base' / 'model'}]",
                        "limit=4", "samples_per_prompt=2", check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and rows[0]["win_rate_vs_first"] == 0.5 and rows[0]["prompts"] == 4
    assert {"informative", "concise", "friendly", "combined"} <= set(rows[1])
