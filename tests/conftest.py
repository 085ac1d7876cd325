"""Shared, expensive fixtures are session-scoped: the quick demo is run once through the real
CLI, and its tokenizer, base, SFT seeds, soup and reward model serve every later test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayalign.utils.env import cpu_defaults

ROOT = Path(__file__).resolve().parents[1]
cpu_defaults(ROOT)


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


def run_cli_killed_after_save(args: list[str], out: Path, iteration: int, log_path: Path,
                              timeout: float = 600) -> None:
    """Start `rayalign ARGS` and SIGKILL its whole process group (Ray included) once the run has
    saved its state at `iteration` (OUT/state/controller.json): a hard crash mid-run."""
    import json
    import signal
    import time

    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rayalign.cli", *args], cwd=ROOT, env=cli_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        controller = out / "state" / "controller.json"
        deadline = time.monotonic() + timeout
        try:
            while not (controller.is_file() and json.loads(controller.read_text())["iteration"] == iteration):
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, f"no saved state after {timeout:g} s"
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick demo, run once: OUT/presets/tiny, OUT/base/model, OUT/sft/sft-{0,1}, OUT/soup, OUT/rm/model.
    RAYALIGN_TEST_DEMO=DIR reuses a finished quick demo while iterating on one test (never in CI)."""
    reuse = os.environ.get("RAYALIGN_TEST_DEMO")
    if reuse and (Path(reuse) / "report.md").is_file():
        return Path(reuse)
    out = tmp_path_factory.mktemp("demo") / "run"
    run_cli("demo", "--quick", "--out", str(out))
    return out


@pytest.fixture(scope="session")
def tokenizer_and_preset(tmp_path_factory: pytest.TempPathFactory):
    """A freshly built tiny preset (random init) and its tokenizer, in-process."""
    from rayalign.models.presets import build_preset, train_tokenizer

    tok = train_tokenizer(0)
    path = build_preset("tiny", tmp_path_factory.mktemp("preset") / "tiny", tok)
    return tok, path
