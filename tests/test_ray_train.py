"""The supervised stages on Ray Train (TorchTrainer, 2 CPU workers, gloo, DeepSpeed ZeRO-2) from a
tiny random preset: a worker SIGKILLed mid-run is restarted from the last reported checkpoint
(FailureConfig), a second kill past max_failures fails the run with its checkpoints kept, `--resume`
finishes it, and the final weights equal an uninterrupted run's; workers spread over a fake
2-node cluster as the scaling config says; resources the cluster cannot give and a storage path
that cannot be written are named before anything is written."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from rayalign.config.core import ConfigError, load_config
from rayalign.config.schema import PretrainConfig, SFTConfig
from rayalign.distributed.placement import PlacementError

SEED = 5


def _sft(base: Path, out: Path, *extra: str) -> SFTConfig:
    return load_config(SFTConfig, None, [
        f"base={base}", f"output={out}", f"seeds=[{SEED}]", "epochs=1", "save_every=2", "world.sft_per_prompt=2",
        "learner.micro_batch_size=8", "learner.zero_stage=2", "train.workers=2", *extra])


def _events(out: Path) -> list[dict]:
    path = out / "logs" / f"ray-train-sft-{SEED}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def two_nodes():
    """One fake Ray cluster for the module: a head with no CPUs and two nodes of 2 CPUs (one Ray
    start for every run here; each stage joins it instead of starting its own)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address)
    try:
        cluster.wait_for_nodes()
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def straight(two_nodes, tokenizer_and_preset, tmp_path_factory):
    """The uninterrupted run, with one worker on each node (STRICT_SPREAD)."""
    from rayalign.recipes.supervised import run_sft

    _, base = tokenizer_and_preset
    out = tmp_path_factory.mktemp("ray-train") / "straight"
    run_sft(_sft(base, out, "train.placement_strategy=STRICT_SPREAD"))
    return base, out


def test_uninterrupted_run_writes_the_model_and_cleans_its_checkpoints(straight, two_nodes):
    _, out = straight
    assert (out / f"sft-{SEED}" / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert not (out / "ray-train").exists() and not (out / "state").exists()  # state lives only until the model
    ev = _events(out)
    assert [e["event"] for e in ev].count("start") == 1 and ev[-1]["event"] == "checkpoint"
    assert sorted(w["rank"] for w in ev[0]["workers"]) == [0, 1]
    assert {w["node_id"] for w in ev[0]["workers"]} == {n.node_id for n in two_nodes}  # one worker per node
    steps = [json.loads(line)["step"] for line in (out / f"logs/sft-{SEED}/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 8


def _kill_rank1_after_a_checkpoint(out: Path, start_index: int, timeout: float = 300) -> tuple[float, int]:
    """Once the `start_index`-th worker group has reported a checkpoint at least 3 s ago (Ray's
    controller registers reports when it next polls the workers, every 2 s), SIGKILL that group's
    rank 1; return the time of the kill and the checkpoint's step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ev = _events(out)
        starts = [i for i, e in enumerate(ev) if e["event"] == "start"]
        if len(starts) > start_index:
            after = ev[starts[start_index]:]
            old = [e for e in after if e["event"] == "checkpoint" and e["time"] < time.time() - 3]
            if old:
                pid = next(w["pid"] for w in after[0]["workers"] if w["rank"] == 1)
                os.kill(pid, signal.SIGKILL)
                return time.time(), old[-1]["step"]
        time.sleep(0.05)
    raise TimeoutError("the workers did not reach the checkpoint to kill at")


def test_killed_worker_restarts_from_checkpoint_then_resume_finishes_with_identical_weights(straight):
    from rayalign.recipes.supervised import run_sft

    base, ref = straight
    out = ref.parent / "killed"
    kills: list[tuple[float, int]] = []

    def killer() -> None:
        kills.append(_kill_rank1_after_a_checkpoint(out, 0))  # the first group: restarted (max_failures=1)
        kills.append(_kill_rank1_after_a_checkpoint(out, 1))  # the restarted group: one failure too many

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    with pytest.raises(RuntimeError, match="Ray Train run failed.*--resume"):
        run_sft(_sft(base, out, "train.max_failures=1"))
    t.join(timeout=10)
    assert len(kills) == 2
    ev = _events(out)
    resumed = [e for e in ev if e["event"] == "resumed"]
    (killed_at, step), _ = kills
    assert len(resumed) == 1 and resumed[0]["time"] > killed_at
    saved = [e["step"] for e in ev if e["event"] == "checkpoint" and e["time"] < killed_at]
    assert step <= resumed[0]["step"] <= max(saved)  # a checkpoint reported before the kill, not step 0
    print(f"\nkilled worker -> resumed training: {resumed[0]['time'] - killed_at:.1f}s")
    assert not (out / f"sft-{SEED}").exists() and any((out / "ray-train" / f"sft-{SEED}").iterdir())

    with pytest.raises(ConfigError, match="already holds a Ray Train run.*--resume"):
        run_sft(_sft(base, out.parent / "fresh", f"train.storage_path={out / 'ray-train'}"))
    assert not (out.parent / "fresh").exists()

    run_sft(_sft(base, out), resume=True)
    ev = _events(out)
    assert ev[-1]["event"] == "checkpoint" and [e["event"] for e in ev].count("resumed") == 2
    a = load_file(str(ref / f"sft-{SEED}/model.safetensors"))
    b = load_file(str(out / f"sft-{SEED}/model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_storage_that_cannot_be_written_is_named_and_nothing_is_written(tokenizer_and_preset, tmp_path):
    from rayalign.recipes.supervised import run_pretrain

    _, preset = tokenizer_and_preset
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = load_config(PretrainConfig, None, [f"model={preset}", f"output={tmp_path / 'out'}", "train.workers=2",
                                             f"train.storage_path={blocker / 'ckpt'}"])
    with pytest.raises(ConfigError, match=f"train.storage_path {blocker / 'ckpt'}: cannot write"):
        run_pretrain(cfg)
    assert not (tmp_path / "out").exists()


def test_workers_the_fake_two_node_cluster_cannot_place_are_named_within_the_timeout(two_nodes,
                                                                                   tokenizer_and_preset, tmp_path):
    from rayalign.recipes.supervised import run_pretrain

    _, preset = tokenizer_and_preset

    def cfg(out: Path, *extra: str) -> PretrainConfig:
        return load_config(PretrainConfig, None, [
            f"model={preset}", f"output={out}", "train.workers=3", "train.placement_timeout_s=3", *extra])

    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"CPU: needs 6, cluster has 4"):
        run_pretrain(cfg(tmp_path / "big", "train.resources_per_worker={CPU: 2}"))
    with pytest.raises(PlacementError, match="STRICT_SPREAD"):  # 3 CPUs are free, but on 2 nodes only
        run_pretrain(cfg(tmp_path / "strict", "train.placement_strategy=STRICT_SPREAD"))
    assert time.monotonic() - t0 < 30  # bounded by placement_timeout_s, not Ray's own wait
    assert not (tmp_path / "big").exists() and not (tmp_path / "strict").exists()
