"""SFT on Ray Train against the same SFT in one process, in the same run, on the same model and data.

Runs `rayalign sft` on the `small` preset (built locally, random init) with the world's SFT rows
(--rows of them), the same global batch (--batch sequences per optimiser step) and the same steps:

  process     the stage in this process (no Ray), micro-batch = batch       -- the peer
  ray-1       Ray Train, 1 worker,  micro-batch = batch
  ray-2       Ray Train, 2 workers, micro-batch = batch / 2 (ZeRO-2, gloo)

and reports optimiser steps/s and sequences/s over the steps after the first (from the run's own
metrics.jsonl time stamps), the wall time of the whole command (Ray start-up, worker start-up,
checkpoints), and ratios against `process`. With --kill, a fourth run (ray-2, train.max_failures=1)
has its rank-1 worker SIGKILLed after its first checkpoint: the seconds from the kill to the
restarted workers loading that checkpoint, and to their first new step.

    python benchmarks/ray_train.py [--rows 1024] [--batch 16] [--kill] [--work .cache/bench-ray-train]

Writes benchmarks/results/ray_train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from peers import ROOT

from rayalign.utils.env import cpu_defaults

cpu_defaults(ROOT)
SEED = 0


def preset(work: Path) -> Path:
    from rayalign.models.presets import build_preset, train_tokenizer

    path = work / "small"
    if not path.is_dir():
        build_preset("small", path, train_tokenizer(0))
    return path


def sft_args(base: Path, out: Path, rows: int, batch: int, workers: int, ray: bool, extra: list[str]) -> list[str]:
    micro = batch // workers
    args = ["sft", f"base={base}", f"output={out}", f"seeds=[{SEED}]", "epochs=1", "save_every=0",
            f"data.limit={rows}", f"learner.micro_batch_size={micro}", "learner.zero_stage=2"]
    if ray:
        args += [f"train.workers={workers}", "train.ray=true"]
    return args + extra


def steady_rate(out: Path) -> tuple[float, int]:
    rows = [json.loads(line) for line in (out / "logs" / f"sft-{SEED}" / "metrics.jsonl").read_text().splitlines()]
    t = [r["time"] for r in rows]
    return (len(t) - 1) / (t[-1] - t[0]), len(t)


def run(name: str, args: list[str], work: Path, kill: bool = False) -> dict:
    out = Path(args[2].removeprefix("output="))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    killed = None
    events = out / "logs" / f"ray-train-sft-{SEED}.jsonl"
    with open(work / f"{name}.log", "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "rayalign.cli", *args], cwd=ROOT, stdout=log_file,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if kill and killed is None and events.is_file():
                ev = [json.loads(line) for line in events.read_text().splitlines()]
                ck = [e for e in ev if e["event"] == "checkpoint"]
                if ck and time.time() - ck[0]["time"] > 3:  # registered by Ray's controller (2 s poll)
                    pid = next(w["pid"] for w in ev[0]["workers"] if w["rank"] == 1)
                    os.kill(pid, signal.SIGKILL)
                    killed = time.time()
            time.sleep(0.05)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {work / f'{name}.log'}")
    rate, steps = steady_rate(out)
    res = {"steps": steps, "steps_per_s": rate, "wall_s": wall}
    if kill:
        ev = [json.loads(line) for line in events.read_text().splitlines()]
        resumed = next(e for e in ev if e["event"] == "resumed")
        metrics = [json.loads(line) for line in (out / "logs" / f"sft-{SEED}" / "metrics.jsonl").read_text()
                   .splitlines()]
        first_new = next(m["time"] for m in metrics if m["time"] > resumed["time"])
        res.update(kill_to_resumed_s=resumed["time"] - killed, kill_to_next_step_s=first_new - killed,
                   resumed_at_step=resumed["step"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--kill", action="store_true")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-ray-train")
    a = ap.parse_args()
    if a.batch % 2:
        raise SystemExit("--batch must be even (two workers split it)")
    a.work.mkdir(parents=True, exist_ok=True)
    base = preset(a.work)
    plans = {"process": (1, False, []), "ray-1": (1, True, []), "ray-2": (2, True, [])}
    results = {}
    for name, (workers, ray, extra) in plans.items():
        results[name] = run(name, sft_args(base, a.work / name, a.rows, a.batch, workers, ray, extra), a.work)
        print(f"{name:8s} {results[name]['steps']} steps  {results[name]['steps_per_s']:.2f} steps/s  "
              f"{results[name]['steps_per_s'] * a.batch:.1f} seq/s  wall {results[name]['wall_s']:.1f}s", flush=True)
    if a.kill:
        args = sft_args(base, a.work / "ray-2-killed", a.rows, a.batch, 2, True,
                        ["train.max_failures=1", "save_every=8"])
        results["ray-2-killed"] = run("ray-2-killed", args, a.work, kill=True)
        k = results["ray-2-killed"]
        print(f"killed worker -> checkpoint loaded {k['kill_to_resumed_s']:.1f}s, -> next step "
              f"{k['kill_to_next_step_s']:.1f}s (resumed at step {k['resumed_at_step']})")
    peer = results["process"]
    for name in ("ray-1", "ray-2"):
        r = results[name]
        r["throughput_ratio_vs_process"] = r["steps_per_s"] / peer["steps_per_s"]
        r["wall_ratio_vs_process"] = r["wall_s"] / peer["wall_s"]
        print(f"{name}: throughput x{r['throughput_ratio_vs_process']:.2f} of one process, "
              f"wall time x{r['wall_ratio_vs_process']:.2f}")
    record = {"preset": "small", "rows": a.rows, "global_batch": a.batch, "cpus": os.cpu_count(), **results}
    dest = ROOT / "benchmarks" / "results" / "ray_train.json"
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, dest)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
