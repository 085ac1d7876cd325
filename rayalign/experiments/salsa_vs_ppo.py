"""SALSA against PPO in the papers' setting (arXiv 2411.01798): a learned reward model, soups of
independently fine-tuned SFT seeds, a beta grid per method, matched KL by interpolation,
over-optimisation curves (Gao et al., arXiv 2210.10760) and the KL hack with a PPO control.

    python -m rayalign.experiments.soup_premise --demo runs/demo --out runs/soup-premise --modes subset
    python -m rayalign.experiments.salsa_vs_ppo --sft runs/soup-premise/sft-subset \\
        --rm runs/soup-premise/rm/model --out runs/salsa-vs-ppo

Every run starts from SFT seed 0 and optimises the reward model's score (`reward.kind=model`); the
gold functions only judge. PPO's KL reference is SFT-0; SALSA's is the uniform soup of SFT seeds
0..N-1. Phases:

1. beta grid: PPO and SALSA (N = 2) at every beta of `--betas`, every seed;
2. each method's beta is chosen by the gold reward of its last training batches (the training
   prompts, never the test prompts), averaged over seeds;
3. SALSA with N = 3, 4 at SALSA's chosen beta, every seed;
4. the KL hack: SALSA (N = 2) and PPO at `--hack-beta`, one seed, the collapse monitor on but not
   stopping the run;
5. judging: every run's snapshots (every `--snapshot-every` iterations, plus SFT-0 at iteration 0)
   on the held-out test prompts -- gold, the reward model's score (the proxy) and the sequence KL to
   SFT-0 (the common starting point, so every curve starts at KL 0).

Matched KL: each run's gold is interpolated linearly along its own (KL to SFT-0, gold) curve at KL
targets every run of both compared cells reaches, and SALSA minus PPO is paired by seed.

Writes OUT/report.md, OUT/results.json, OUT/over_optimisation.png, OUT/matched_kl.png,
OUT/training_curves.png and OUT/kl_hack_length.png; judgments are cached in OUT/judged.json, and
finished runs are skipped, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import ray

from rayalign.config.core import load_config
from rayalign.config.schema import RLConfig
from rayalign.distributed.cluster import connect
from rayalign.eval.kl import sequence_kl
from rayalign.experiments.common import Judge, floats, ints, mean_se, write_report
from rayalign.models.checkpoint import load_causal_lm
from rayalign.recipes.ppo import run_rl
from rayalign.utils.io import atomic_write_json
from rayalign.utils.logging import log, setup_logging

KL_TARGETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def cell(method: str, n: int = 2) -> str:
    return "ppo" if method == "ppo" else f"salsa{n}"


def run_name(cell_: str, beta: float, seed: int) -> str:
    return f"{cell_}-b{beta:g}-s{seed}"


class Study:
    def __init__(self, sft: Path, rm: Path, out: Path, seeds: list[int], steps: int, snapshot_every: int,
                 overrides: list[str]):
        self.sft, self.rm, self.out, self.seeds = sft, rm, out, seeds
        self.steps, self.snapshot_every, self.overrides = steps, snapshot_every, overrides
        self.runs: dict[str, dict[str, Any]] = {}

    def seed_path(self, i: int) -> Path:
        return self.sft / f"sft-{i}"

    def train(self, cell_: str, beta: float, seed: int, name: str | None = None, steps: int | None = None,
              extra: tuple[str, ...] = ()) -> Path:
        name = name or run_name(cell_, beta, seed)
        n = 1 if cell_ == "ppo" else int(cell_[5:])
        refs = "[]" if n == 1 else "[" + ",".join(str(self.seed_path(i)) for i in range(n)) + "]"
        cfg = load_config(RLConfig, "ppo", [
            f"policy={self.seed_path(0)}", f"reference.models={refs}", "reward.kind=model", f"reward.model={self.rm}",
            f"output={self.out / name}", f"steps={steps or self.steps}", f"seed={seed}", f"algo.beta={beta}",
            f"snapshot_every={self.snapshot_every}", *self.overrides, *extra])
        log.info("salsa-vs-ppo: %s (%s, beta %g, seed %d)", name, cell_, beta, seed)
        run_rl(cfg, "ppo" if n == 1 else "salsa", resume=True)
        self.runs[name] = {"cell": cell_, "beta": beta, "seed": seed, "path": self.out / name}
        return self.out / name

    def train_batch_gold(self, cell_: str, beta: float, last: int = 5) -> float:
        """Mean gold of the last `last` training batches (training prompts), averaged over seeds."""
        return float(np.mean([np.mean([r["gold/combined"] for r in metrics(self.out / run_name(cell_, beta, s))][-last:])
                              for s in self.seeds]))


class Judged:
    """Gold, proxy (reward model) and KL to SFT-0 of checkpoints on the test prompts, cached on disk."""

    def __init__(self, sft0: Path, rm: Path, samples: int, max_new_tokens: int, cache: Path):
        self.judge = Judge(rm, samples, max_new_tokens)
        self.sft0, self.tok = load_causal_lm(sft0)
        self.cache = cache
        self.done: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.exists() else {}

    def __call__(self, path: Path) -> dict[str, float]:
        key = str(path)
        if key not in self.done:
            model, _ = load_causal_lm(path)
            r = self.judge(model, self.tok, path.name)
            kl = sequence_kl(model, self.sft0, self.tok, self.judge.prompts, n=self.judge.samples,
                             max_new_tokens=self.judge.max_new_tokens, seed=99)
            self.done[key] = {**r, "kl_sft0": kl.mean, "kl_sft0_se": kl.se}
            atomic_write_json(self.cache, self.done)
        return self.done[key]


def curve(run: Path, steps: int, every: int, judged: Judged, sft0: Path) -> list[dict[str, float]]:
    """(iteration, gold, proxy, KL to SFT-0) from SFT-0 through every snapshot to the final policy."""
    points = [{"iteration": 0, **judged(sft0)}]
    for it in range(every, steps, every) if every else ():
        points.append({"iteration": it, **judged(run / "snapshots" / f"iter{it}")})
    points.append({"iteration": steps, **judged(run / "policy")})
    return points


def gold_at(points: list[dict[str, float]], kl: float) -> float | None:
    """Gold interpolated at KL `kl` along the run's curve in iteration order: the first segment that
    crosses `kl` (None when the run never reaches it)."""
    for a, b in zip(points, points[1:]):
        lo, hi = sorted((a["kl_sft0"], b["kl_sft0"]))
        if lo <= kl <= hi:
            t = 0.0 if hi == lo else (kl - a["kl_sft0"]) / (b["kl_sft0"] - a["kl_sft0"])
            return float(a["gold"] + t * (b["gold"] - a["gold"]))
    return None


def best_within(points: list[dict[str, float]], kl: float) -> float:
    """The run's best gold at KL <= `kl` (Gao et al.'s view of a KL budget): over its snapshots within
    the budget and the interpolated points wherever its curve crosses `kl`."""
    golds = [p["gold"] for p in points if p["kl_sft0"] <= kl]
    for a, b in zip(points, points[1:]):
        lo, hi = sorted((a["kl_sft0"], b["kl_sft0"]))
        if lo < kl < hi:
            golds.append(a["gold"] + (kl - a["kl_sft0"]) / (b["kl_sft0"] - a["kl_sft0"]) * (b["gold"] - a["gold"]))
    return float(max(golds))


def matched(curves: dict[str, list[dict[str, float]]], a: list[str], b: list[str]) -> list[dict[str, Any]]:
    """Gold of cell a minus cell b at every KL target that all their runs reach, paired by position (seed):
    where each run's curve first crosses the target, and the best gold each reaches within it."""
    rows = []
    for kl in KL_TARGETS:
        ga = [gold_at(curves[k], kl) for k in a]
        gb = [gold_at(curves[k], kl) for k in b]
        if None in ga or None in gb:
            continue
        fa = [best_within(curves[k], kl) for k in a]
        fb = [best_within(curves[k], kl) for k in b]
        rows.append({"kl": kl, "a": mean_se(ga), "b": mean_se(gb), "diff": mean_se([x - y for x, y in zip(ga, gb)]),
                     "best_a": mean_se(fa), "best_b": mean_se(fb),
                     "best_diff": mean_se([x - y for x, y in zip(fa, fb)])})
    return rows


def run(sft: Path, rm: Path, out: Path, seeds: list[int], betas: list[float], soups: list[int], steps: int,
        every: int, hack_beta: float, hack_estimator: str, hack_steps: int, samples: int, max_new_tokens: int,
        overrides: list[str]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    study = Study(sft, rm, out, seeds, steps, every, [f"rollout.max_new_tokens={max_new_tokens}", *overrides])
    started = connect()
    try:
        for beta in betas:  # 1. the grid
            for seed in seeds:
                for c in ("ppo", "salsa2"):
                    study.train(c, beta, seed)
        chosen = {c: max(betas, key=lambda b: study.train_batch_gold(c, b)) for c in ("ppo", "salsa2")}  # 2.
        log.info("salsa-vs-ppo: chosen beta %s", chosen)
        for n in soups:  # 3. bigger soups at SALSA's beta
            if n != 2:
                for seed in seeds:
                    study.train(f"salsa{n}", chosen["salsa2"], seed)
        hack = ("monitor.stop_on_collapse=false", f"algo.kl_estimator={hack_estimator}")
        for c in ("salsa2", "ppo"):  # 4. the KL hack and its control
            study.train(c, hack_beta, seeds[0], name=f"hack-{c}", steps=hack_steps, extra=hack)
    finally:
        if started:
            ray.shutdown()

    judged = Judged(study.seed_path(0), rm, samples, max_new_tokens, out / "judged.json")  # 5.
    curves = {name: curve(r["path"], steps, every, judged, study.seed_path(0))
              for name, r in study.runs.items() if not name.startswith("hack-")}
    cells = sorted({(r["cell"], r["beta"]) for n, r in study.runs.items() if not n.startswith("hack-")},
                   key=lambda t: (t[0] != "ppo", t[0], t[1]))
    summary = {}
    for c, beta in cells:
        names = [run_name(c, beta, s) for s in seeds]
        last = [curves[k][-1] for k in names]
        peak = [max(curves[k], key=lambda p: p["gold"]) for k in names]
        summary[f"{c}@{beta:g}"] = {
            "cell": c, "beta": beta, "train_batch_gold": study.train_batch_gold(c, beta),
            "gold": mean_se([p["gold"] for p in last]), "proxy": mean_se([p["rm"] for p in last]),
            "kl_sft0": mean_se([p["kl_sft0"] for p in last]), "words": mean_se([p["words"] for p in last]),
            "peak_gold": mean_se([p["gold"] for p in peak]), "peak_iteration": [p["iteration"] for p in peak],
            "proxy_gain_after_gold_peak": mean_se([lp["rm"] - pp["rm"] for lp, pp in zip(last, peak)]),
            "gold_drop_after_peak": mean_se([pp["gold"] - lp["gold"] for lp, pp in zip(last, peak)]),
        }
    ppo_names = [run_name("ppo", chosen["ppo"], s) for s in seeds]
    comparisons = {}
    for n in soups:
        names = [run_name(f"salsa{n}", chosen["salsa2"], s) for s in seeds]
        comparisons[f"salsa{n}@{chosen['salsa2']:g} - ppo@{chosen['ppo']:g}"] = matched(curves, names, ppo_names)
    for beta in betas:  # the same beta, for the record
        comparisons[f"salsa2@{beta:g} - ppo@{beta:g}"] = matched(
            curves, [run_name("salsa2", beta, s) for s in seeds], [run_name("ppo", beta, s) for s in seeds])
    hack_runs = {c: metrics(out / f"hack-{c}") for c in ("salsa2", "ppo")}
    results: dict[str, Any] = {
        "sft": str(sft), "reward_model": str(rm), "seeds": seeds, "betas": betas, "soups": soups, "steps": steps,
        "snapshot_every": every, "overrides": overrides, "test_prompts": len(judged.judge.prompts), "samples": samples,
        "max_new_tokens": max_new_tokens, "sft0": curves[ppo_names[0]][0], "chosen_beta": chosen, "cells": summary,
        "matched_kl": comparisons,
        "kl_hack": {c: {"beta": hack_beta, "estimator": hack_estimator, "steps": hack_steps,
                        "length": [r["response/length"] for r in rows], "kl": [r["kl/sequence"] for r in rows],
                        "gold": [r["gold/combined"] for r in rows],
                        "alarms": [int(r["step"]) for r in rows if r.get("monitor/collapse")]}
                    for c, rows in hack_runs.items()},
        "curves": curves,
    }
    plots(results, study, out)
    write_report(out, results, render(results))
    return results


def plots(r: dict[str, Any], study: Study, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds, curves = r["seeds"], r["curves"]

    def style(ax: Any, xlabel: str, ylabel: str | None = None, title: str | None = None) -> None:
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    def mean_curve(c: str, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pts = [curves[run_name(c, beta, s)] for s in seeds]
        return tuple(np.mean([[p[k] for p in ps] for ps in pts], axis=0) for k in ("kl_sft0", "rm", "gold"))

    # over-optimisation: proxy and gold against KL to SFT-0, one line per beta (mean over seeds)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="row")
    for row, c in enumerate(("ppo", "salsa2")):
        for beta in r["betas"]:
            kl, proxy, gold = mean_curve(c, beta)
            axes[row][0].plot(np.sqrt(kl), proxy, marker="o", markersize=3, label=f"beta {beta:g}")
            axes[row][1].plot(np.sqrt(kl), gold, marker="o", markersize=3, label=f"beta {beta:g}")
        name = "PPO (ref SFT-0)" if c == "ppo" else "SALSA (ref soup of 2 seeds)"
        axes[row][0].set_title(f"{name}: proxy (reward model)", fontsize=9)
        axes[row][1].set_title(f"{name}: gold", fontsize=9)
        for ax in axes[row]:
            style(ax, "sqrt(KL to SFT-0), test prompts")
    fig.suptitle(f"Over-optimisation (arXiv 2210.10760): snapshots every {r['snapshot_every']} iterations, "
                 f"mean of {len(seeds)} seeds", fontsize=10)
    save(fig, "over_optimisation.png")

    # matched KL: the chosen cells' gold against KL, each seed's curve thin, targets marked
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    chosen = r["chosen_beta"]
    shown = [("ppo", chosen["ppo"])] + [(f"salsa{n}", chosen["salsa2"]) for n in r["soups"]]
    for i, (c, beta) in enumerate(shown):
        for j, s in enumerate(seeds):
            pts = curves[run_name(c, beta, s)]
            ax.plot([p["kl_sft0"] for p in pts], [p["gold"] for p in pts], color=colours[i], alpha=0.7,
                    marker="o", markersize=2.5, linewidth=1, label=f"{c} beta {beta:g}" if j == 0 else None)
    style(ax, "KL to SFT-0 (test prompts)", "gold reward (combined)",
          "Gold against KL at each method's chosen beta (one line per seed)")
    save(fig, "matched_kl.png")

    # training batches: proxy and gold against KL to the run's own reference, per iteration
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (c, beta) in enumerate(shown):
        rows = [metrics(study.out / run_name(c, beta, s)) for s in seeds]
        kl = np.mean([[x["kl/sequence"] for x in rs] for rs in rows], axis=0)
        for ax, key in zip(axes, ("reward/score", "gold/combined")):
            ax.plot(kl, np.mean([[x[key] for x in rs] for rs in rows], axis=0), color=colours[i],
                    label=f"{c} beta {beta:g}")
    for ax, label in zip(axes, ("proxy (reward model, before normalisation)", "gold")):
        style(ax, "KL to own reference (training batch, per iteration)", label)
    save(fig, "training_curves.png")

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (c, h) in enumerate(r["kl_hack"].items()):
        ax.plot(range(1, len(h["length"]) + 1), h["length"], color=colours[i],
                label=f"{'SALSA (soup ref)' if c != 'ppo' else 'PPO (SFT-0 ref)'} beta {h['beta']:g}, {h['estimator']}")
        ax.scatter(h["alarms"], [h["length"][a - 1] for a in h["alarms"]], color="red", marker="x", zorder=3)
    style(ax, "iteration", "mean response length (tokens)", "KL hack and its control (x = collapse alarm)")
    save(fig, "kl_hack_length.png")


def render(r: dict[str, Any]) -> str:
    def f(x: list[float], p: int = 3) -> str:
        return f"{x[0]:.{p}f} ± {x[1]:.{p}f}"

    s0 = r["sft0"]
    lines = [
        "# SALSA against PPO with a learned reward and independent SFT seeds", "",
        f"SFT seeds from `{r['sft']}`, reward model `{r['reward_model']}` (the proxy every run optimises); gold only "
        f"judges. Seeds {r['seeds']}, {r['steps']} iterations, snapshots every {r['snapshot_every']}; overrides "
        f"{r['overrides']}. Judged on {r['test_prompts']} test prompts x {r['samples']} samples, <= "
        f"{r['max_new_tokens']} new tokens; mean ± standard error over seeds. SFT-0: gold {s0['gold']:.3f}, proxy "
        f"{s0['rm']:.3f}.", "",
        f"Chosen beta (gold of the last 5 training batches, training prompts): PPO {r['chosen_beta']['ppo']:g}, "
        f"SALSA {r['chosen_beta']['salsa2']:g}.", "",
        "## Final policies and over-optimisation", "",
        "![over-optimisation](over_optimisation.png)", "",
        "| cell | beta | train-batch gold | test gold | proxy | KL to SFT-0 | words | peak gold (iterations) | "
        "gold lost after peak | proxy gained after gold peak |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["cells"].values():
        lines.append(f"| {c['cell']} | {c['beta']:g} | {c['train_batch_gold']:.3f} | {f(c['gold'])} | {f(c['proxy'])} | "
                     f"{f(c['kl_sft0'], 2)} | {c['words'][0]:.1f} | {f(c['peak_gold'])} ({c['peak_iteration']}) | "
                     f"{f(c['gold_drop_after_peak'])} | {f(c['proxy_gain_after_gold_peak'])} |")
    lines += ["", "## Matched KL (difference paired by seed)", "",
              "Gold where each run's curve (in training order) first crosses the KL target, interpolated between "
              "snapshots; and the best gold each run reaches at KL <= the target (its frontier).", "",
              "![matched KL](matched_kl.png)", "",
              "| comparison | KL to SFT-0 | gold A (first crossing) | gold B | A - B | best A within KL | best B | A - B |",
              "|---|---|---|---|---|---|---|---|"]
    for name, rows in r["matched_kl"].items():
        if not rows:
            lines.append(f"| {name} | no KL reached by every run of both | | | | | | |")
        for row in rows:
            lines.append(f"| {name} | {row['kl']:g} | {f(row['a'])} | {f(row['b'])} | {f(row['diff'])} | "
                         f"{f(row['best_a'])} | {f(row['best_b'])} | {f(row['best_diff'])} |")
    lines += ["", "## Training batches", "", "![training curves](training_curves.png)", "",
              "## KL hack with a PPO control", "", "![KL hack](kl_hack_length.png)", "",
              "| reference | beta | estimator | length first -> last (min) | KL last | gold first -> last | alarms |",
              "|---|---|---|---|---|---|---|"]
    for c, h in r["kl_hack"].items():
        lines.append(f"| {'soup of 2 seeds' if c != 'ppo' else 'SFT-0'} | {h['beta']:g} | {h['estimator']} | "
                     f"{h['length'][0]:.1f} -> {h['length'][-1]:.1f} ({min(h['length']):.1f}) | {h['kl'][-1]:.2f} | "
                     f"{h['gold'][0]:.3f} -> {h['gold'][-1]:.3f} | {len(h['alarms'])} (first {h['alarms'][:1]}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", type=Path, required=True, help="a `rayalign sft` output with sft-0 .. sft-(max N - 1)")
    p.add_argument("--rm", type=Path, required=True, help="the reward model every run optimises")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=ints, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    p.add_argument("--betas", type=floats, default=[0.003, 0.01, 0.03, 0.1], help="the grid for both methods")
    p.add_argument("--soups", type=ints, default=[2, 3, 4], help="SALSA soup sizes N (2 is on the grid)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--snapshot-every", type=int, default=5)
    p.add_argument("--hack-beta", type=float, default=10.0)
    p.add_argument("--hack-estimator", choices=["k1", "k2", "k3"], default="k3")
    p.add_argument("--hack-steps", type=int, default=20)
    p.add_argument("--samples", type=int, default=4, help="samples per test prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("overrides", nargs="*", default=["prompts_per_step=16", "rollout.n=4"],
                   help="dotted overrides for every run (default: prompts_per_step=16 rollout.n=4)")
    a = p.parse_args()
    if 2 not in a.soups:
        p.error("--soups must include 2 (the beta grid runs SALSA with a soup of 2)")
    for i in range(max(a.soups)):
        if not (a.sft / f"sft-{i}").is_dir():
            p.error(f"--sft {a.sft}: no sft-{i} inside (a soup of {max(a.soups)} needs seeds 0..{max(a.soups) - 1}; "
                    "train them with `rayalign sft seeds=[...] seed_data=subset`)")
    if not a.rm.is_dir():
        p.error(f"--rm {a.rm}: not a directory (train one with `rayalign rm`)")
    if a.steps % a.snapshot_every if a.snapshot_every else False:
        p.error(f"--steps {a.steps} is not a multiple of --snapshot-every {a.snapshot_every}")
    setup_logging()
    run(a.sft, a.rm, a.out, a.seeds, a.betas, a.soups, a.steps, a.snapshot_every, a.hack_beta, a.hack_estimator,
        a.hack_steps, a.samples, a.max_new_tokens, a.overrides)


if __name__ == "__main__":
    main()
