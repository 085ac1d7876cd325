"""Shared, expensive fixtures are session-scoped: the quick demo is run once through the real
CLI, and its tokenizer, base, SFT seeds, soup and reward model serve every later test."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rayalign.utils.env import cpu_defaults

ROOT = Path(__file__).resolve().parents[1]
cpu_defaults(ROOT)


# `make test-fast` (pytest -m fast): these modules' tests that need no quick demo
FAST_MODULES = {"test_ppo_math", "test_preference_math", "test_merge", "test_config", "test_placement", "test_world",
                "test_pareto", "test_serve_units", "test_sync_buckets", "test_models", "test_logprobs",
                "test_reward_sources", "test_logging", "test_lora", "test_scorers"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in FAST_MODULES and "quick_demo" not in item.fixturenames:
            item.add_marker(pytest.mark.fast)


def cli_env() -> dict[str, str]:
    """The test environment minus RAY_ADDRESS: a command run as a user would start its own Ray."""
    env = os.environ.copy()
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(*args: str, check: bool = True, timeout: float = 900,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `rayalign ARGS` in a fresh interpreter, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "rayalign.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env if env is not None else cli_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"rayalign {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def run_cli_here(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real `rayalign` CLI app in this process (typer's CliRunner), for commands that stop
    before any Ray or training starts -- bad flags, configs, paths: the same parsing, errors and
    exit codes as `run_cli`, without a fresh interpreter's ~10 s of imports."""
    from typer.testing import CliRunner

    from rayalign.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if check and result.exit_code != 0:
        raise AssertionError(f"rayalign {' '.join(args)} exited {result.exit_code}\nstdout:\n{result.stdout[-4000:]}\n"
                             f"stderr:\n{result.stderr[-6000:]}")
    return subprocess.CompletedProcess(["rayalign", *args], result.exit_code, result.stdout, result.stderr)


def run_cli_killed_after_save(args: list[str], out: Path, iteration: int, log_path: Path,
                              timeout: float = 600) -> int:
    """Start `rayalign ARGS` and SIGKILL its whole process group (Ray included) as soon as the run
    has saved its state at `iteration` or later (OUT/state/controller.json): a hard crash mid-run.
    Returns the iteration the state on disk holds after the kill (a fast run may save once more
    between the check and the kill)."""
    import json
    import signal

    controller = out / "state" / "controller.json"

    def saved() -> int:
        try:
            return int(json.loads(controller.read_text())["iteration"])
        except (FileNotFoundError, ValueError, KeyError):  # not written yet, or being replaced
            return -1

    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rayalign.cli", *args], cwd=ROOT, env=cli_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while saved() < iteration:
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, f"no saved state after {timeout:g} s"
                time.sleep(0.02)
            assert proc.poll() is None, "the run finished before it could be killed mid-run"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return saved()


def hf_greedy(model, tok, prompts: list[list[int]], max_new_tokens: int = 12) -> list[list[int]]:
    """transformers' greedy continuation of each tokenised prompt: the reference for rollout engines."""
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out.append(gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray of 2 CPUs for one test module (modules that start Ray through the CLI
    must not share it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


RAY_BIN = Path(sys.executable).parent / "ray"


def stop_process_group(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    """Signal a process started with start_new_session=True and its whole group (Ray, engines);
    SIGKILL the group if it is not gone after `timeout` seconds."""
    import signal

    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def ray_head(log_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real Ray head on 127.0.0.1 as a user starts one (`ray start --head`, 2 CPUs, the dashboard
    that takes job submissions, Ray's token authentication). Yields the dashboard address and the
    environment `ray job ...` commands need; stops exactly this head on exit (never `ray stop`,
    which would take every Ray on the machine)."""
    import secrets
    import signal
    import tempfile

    import psutil

    from rayalign.learner.dist import free_port

    temp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # Ray's socket paths must stay short
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    env = {**cli_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(RAY_BIN), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=2",
             "--num-gpus=0", "--disable-usage-stats", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--temp-dir={temp}", "--block"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(RAY_BIN), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert proc.poll() is None, f"ray start --head exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no job server at {address} after 120 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)
        yield address, env
    finally:
        stop_process_group(proc, signal.SIGTERM, timeout=30)
        for p in psutil.process_iter(["cmdline"]):  # anything of this head that left the group
            if any(str(temp) in arg for arg in (p.info["cmdline"] or [])):
                p.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick demo, run once, submitted as a user would to a cluster: `ray start --head` on
    127.0.0.1, `ray job submit` with clusters/runtime_env/laptop.yaml, wait, status SUCCEEDED.
    It leaves OUT/presets/tiny, OUT/base/model, OUT/sft/sft-{0,1}, OUT/soup, OUT/rm/model, ...
    RAYALIGN_TEST_DEMO=DIR reuses a finished quick demo while iterating on one test (never in CI)."""
    reuse = os.environ.get("RAYALIGN_TEST_DEMO")
    if reuse and (Path(reuse) / "report.md").is_file():
        return Path(reuse)
    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "run"
    with ray_head(tmp / "ray-head.log") as (address, env):
        job = [str(RAY_BIN), "job", "submit", "--address", address, "--submission-id", "quick-demo",
               "--runtime-env", str(ROOT / "clusters/runtime_env/laptop.yaml"), "--",
               sys.executable, "-m", "rayalign.cli", "demo", "--quick", "--out", str(out)]
        for _ in range(30):  # the job server answers before the node's agent takes jobs (slow on a loaded box)
            proc = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
            if proc.returncode == 0 or "No available agent to submit job" not in proc.stderr + proc.stdout:
                break
            time.sleep(2)
        status = subprocess.run([str(RAY_BIN), "job", "status", "--address", address, "quick-demo"], env=env,
                                capture_output=True, text=True)
        (tmp / "job.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0 and "Job 'quick-demo' succeeded" in status.stdout, (
            f"ray job submit exited {proc.returncode}; status: {status.stdout[-500:]}\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}")
    return out


@pytest.fixture(scope="session")
def tokenizer_and_preset(tmp_path_factory: pytest.TempPathFactory):
    """A freshly built tiny preset (random init) and its tokenizer, in-process."""
    from rayalign.models.presets import build_preset, train_tokenizer

    tok = train_tokenizer(0)
    path = build_preset("tiny", tmp_path_factory.mktemp("preset") / "tiny", tok)
    return tok, path


@pytest.fixture(scope="session")
def checkpoints(tokenizer_and_preset, tmp_path_factory):
    """Three mergeable checkpoints without the demo: the tiny preset (random init, seed 0) as `base`
    and two more of the same architecture and tokenizer with other seeds, `a` and `b` (~1 s). For
    tests that need models to merge, adapt or load, not trained ones."""
    from rayalign.models.presets import build_preset

    tok, base = tokenizer_and_preset
    root = tmp_path_factory.mktemp("checkpoints")
    return {"base": base, "a": build_preset("tiny", root / "a", tok, seed=1),
            "b": build_preset("tiny", root / "b", tok, seed=2)}
