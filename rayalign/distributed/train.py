"""The supervised stages (pretrain, sft, rm) on Ray Train: the same per-rank training function,
run by a TorchTrainer's workers instead of this process.

    with stage_session(cfg.train, out, resume, ["sft-0"]):   # checks storage and resources first
        run_stage(cfg.train, partial(body, cfg), out, "sft-0", resume, "sft seed 0")

`body(state)` is a stage's whole per-rank work (load the model, `fit`, save the final model from
rank 0). Without Ray Train it runs here with its state in OUT/state/NAME; with Ray Train every
worker runs it after Ray has formed the torch.distributed group (gloo on CPU, NCCL on GPU), and
its state is Ray Train checkpoints in STORAGE/NAME: every worker saves its DeepSpeed shard and
reports it with `ray.train.report`, Ray keeps the newest `keep_checkpoints`, and a restarted
worker group (FailureConfig.max_failures) or a `--resume` run loads the latest one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rayalign.config.core import ConfigError
from rayalign.config.schema import TrainScaling
from rayalign.distributed.placement import PlacementError, PlacementPlan, RoleDemand, cluster_nodes
from rayalign.learner.dist import barrier, is_rank0
from rayalign.utils.logging import log

STORAGE_DIR = "ray-train"  # default storage under OUTPUT
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError)


def is_uri(path: str) -> bool:
    return "://" in path


def storage_of(scaling: TrainScaling, out: Path) -> str:
    """The storage path Ray Train writes checkpoints to (absolute, or a URI)."""
    if scaling.storage_path is None:
        return str((out / STORAGE_DIR).absolute())
    return scaling.storage_path if is_uri(scaling.storage_path) else str(Path(scaling.storage_path).absolute())


def check_storage(path: str) -> None:
    """A local storage path must be a directory this process can create and write."""
    if is_uri(path):
        return
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".rayalign-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"train.storage_path {path}: cannot write checkpoints there ({exc.strerror or exc})") \
            from None


def worker_plan(scaling: TrainScaling, use_gpu: bool) -> PlacementPlan:
    res = dict(scaling.resources_per_worker)
    cpus = res.pop("CPU", 1.0)
    gpus = res.pop("GPU", 1.0 if use_gpu else 0.0)
    return PlacementPlan.build([RoleDemand("train worker", scaling.workers, cpus, gpus)],
                               strategy=scaling.placement_strategy)


def resolve_use_gpu(scaling: TrainScaling) -> bool:
    if scaling.use_gpu is not None:
        return scaling.use_gpu
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def wait_for_workers(plan: PlacementPlan, timeout_s: float) -> None:
    """Check the workers fit the cluster, then have Ray grant them once (which also asks an
    autoscaler for nodes), waiting at most `timeout_s`; PlacementError names what is missing."""
    try:
        plan.check(cluster_nodes())
        static = None
    except PlacementError as exc:
        static = exc
    try:
        plan.reserve(timeout_s=timeout_s) if static is None else _reserve_unchecked(plan, timeout_s)
    except PlacementError as exc:
        raise PlacementError(f"Ray Train workers ({plan.describe().splitlines()[0].removeprefix('placement plan ')}): "
                             f"{static or exc}; not granted within {timeout_s:g}s") from None
    finally:
        plan.release()


def _reserve_unchecked(plan: PlacementPlan, timeout_s: float) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(plan.bundles, strategy=plan.strategy)
    if not pg.wait(timeout_seconds=timeout_s):
        remove_placement_group(pg)
        raise PlacementError(f"free resources now: {ray.available_resources()}")
    plan.pg = pg


def preflight(scaling: TrainScaling, out: Path, resume: bool, names: list[str]) -> bool:
    """Everything that can fail before a stage writes anything: the storage path is writable and
    holds none of the runs `names` unless resuming (Ray Train would silently continue them), and
    Ray can place the workers. Connects to Ray when Ray Train is used; returns True when this call
    started Ray."""
    if not scaling.enabled:
        return False
    storage = storage_of(scaling, out)
    if scaling.storage_path is not None:
        check_storage(storage)
    if not resume and not is_uri(storage):
        for name in names:
            run_dir = Path(storage) / name
            if run_dir.is_dir() and any(run_dir.iterdir()):
                raise ConfigError(f"{run_dir} already holds a Ray Train run named {name!r}; pass --resume to "
                                  "continue it or choose another train.storage_path")
    from rayalign.distributed.cluster import connect

    started = connect(scaling.ray_address)
    wait_for_workers(worker_plan(scaling, resolve_use_gpu(scaling)), scaling.placement_timeout_s)
    return started


@contextmanager
def stage_session(scaling: TrainScaling, out: Path, resume: bool, names: list[str]) -> Iterator[None]:
    """`preflight`, then the stage's runs `names`; shuts down a Ray that preflight started."""
    started = preflight(scaling, out, resume, names)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def expect_output(path: Path, scaling: TrainScaling) -> Path:
    """The final model the stage's rank 0 wrote; under Ray Train on several nodes it is missing
    here when OUTPUT is not on storage every node shares."""
    if scaling.enabled and not path.is_dir():
        raise RuntimeError(f"the Ray Train run finished but {path} is not here: rank 0 wrote it on its own node. "
                           "On a multi-node cluster OUTPUT must be on storage every node mounts (e.g. /mnt/shared)")
    return path


def run_stage(scaling: TrainScaling, body: Callable[[Any], Any], out: Path, name: str, resume: bool,
              desc: str, zero_stage: int = 0) -> None:
    """Run `body(state)` on every rank, in this process or on Ray Train (see the module doc)."""
    if not scaling.enabled:
        from rayalign.recipes.loop import DirState

        state_dir = out / "state" / name
        body(DirState(state_dir))
        barrier()
        if is_rank0():  # training state is only needed until the final model is written
            shutil.rmtree(state_dir, ignore_errors=True)
            _rmdir_if_empty(out / "state")
        return
    _run_on_ray_train(scaling, body, out, name, resume, desc, zero_stage)


def _run_on_ray_train(scaling: TrainScaling, body: Callable[[Any], Any], out: Path, name: str, resume: bool,
                      desc: str, zero_stage: int) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = storage_of(scaling, out)
    run_dir = None if is_uri(storage) else Path(storage) / name
    use_gpu = resolve_use_gpu(scaling)
    res = dict(scaling.resources_per_worker) or None
    backend = "nccl" if use_gpu else "gloo"
    log.info("%s: Ray Train, %d worker(s) (%s, %s), checkpoints in %s/%s", desc, scaling.workers,
             "GPU" if use_gpu else "CPU", backend, storage, name)
    events = out / "logs" / f"ray-train-{name}.jsonl"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"body": body, "events": str(events.absolute()), "zero_stage": zero_stage},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=use_gpu, resources_per_worker=res,
                                     placement_strategy=scaling.placement_strategy),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=scaling.keep_checkpoints)),
    )
    t0 = time.monotonic()
    try:
        trainer.fit()
    except TrainingFailedError as exc:
        failures = list(getattr(exc, "worker_failures", {}).values())
        user = [f for f in failures if isinstance(f, USER_ERRORS)]
        if failures and len(user) == len(failures):
            raise user[0] from None  # a bad config, dataset row or checkpoint: its own message
        raise RuntimeError(f"{desc}: the Ray Train run failed (train.max_failures = {scaling.max_failures}); "
                           f"its checkpoints stay in {storage}/{name} for --resume:\n{exc}") from None
    log.info("%s: Ray Train run finished in %.1fs", desc, time.monotonic() - t0)
    if run_dir is not None and scaling.storage_path is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        _rmdir_if_empty(run_dir.parent)


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# ---- inside a Ray Train worker -------------------------------------------------------------------

def _worker(config: dict[str, Any]) -> None:
    config["body"](RayTrainState(Path(config["events"]), config["zero_stage"]))


class RayTrainState:
    """A supervised run's state as Ray Train checkpoints (rayalign.recipes.loop.TrainState)."""

    def __init__(self, events: Path, zero_stage: int = 0):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.events, self.zero_stage = events, zero_stage
        self.where = f"the Ray Train checkpoints of {ctx.get_experiment_name()!r}"
        self._event("start", **self._placement())

    def _placement(self) -> dict[str, Any]:
        """Where every worker runs (gathered on rank 0): node, host, pid, GPUs."""
        import ray
        import torch.distributed as dist

        me = {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
              "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, me)
        return {"workers": every}

    def _event(self, kind: str, **fields: Any) -> None:
        if self.rank != 0:
            return
        self.events.parent.mkdir(parents=True, exist_ok=True)
        with open(self.events, "a") as f:
            f.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")

    def load(self, learner: Any) -> dict[str, Any] | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            meta = json.loads((Path(d) / "rayalign_state.json").read_text())
            if self.zero_stage > 0 and meta["world_size"] != self.world_size:
                raise ConfigError(f"the checkpoint {ckpt.path} was saved by {meta['world_size']} workers and holds "
                                  f"ZeRO-{self.zero_stage} shards for that many; resume with "
                                  f"train.workers={meta['world_size']}")
            client = learner.load_state(d)
        self._event("resumed", step=int(client["step"]), checkpoint=ckpt.path)
        return client

    def save(self, learner: Any, client_state: dict[str, Any], metrics: dict[str, float]) -> None:
        import ray.train
        from ray.train import Checkpoint

        local = Path(tempfile.mkdtemp(prefix=f"rayalign-ckpt-{self.rank}-"))
        try:
            learner.save_state(local, client_state)
            if self.rank == 0:
                (local / "rayalign_state.json").write_text(json.dumps(
                    {**client_state, "world_size": self.world_size}) + "\n")
            ray.train.report({"step": int(client_state["step"]), **metrics},
                             checkpoint=Checkpoint.from_directory(str(local)),
                             checkpoint_dir_name=f"checkpoint-step{int(client_state['step']):07d}")
        finally:
            shutil.rmtree(local, ignore_errors=True)
        self._event("checkpoint", step=int(client_state["step"]))
