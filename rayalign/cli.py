"""The `rayalign` command.

    rayalign demo                      # the whole story on the embedded default
    rayalign presets OUT               # tokenizer + tiny/small Llama presets (random init)
    rayalign world OUT                 # the synthetic world's data sets as JSONL
    rayalign convert pku-saferlhf OUT  # helpful / harmless pairs (for rm) and prompts (for train)
    rayalign pretrain model=PRESET output=DIR
    rayalign sft --config sft.yaml learner.lr=1e-4 seeds=[0,1,2]
    rayalign rm base=SFT_DIR output=DIR objectives=each
    rayalign merge merge.yaml OUT      # soups, task arithmetic, ExPO, Bone Soups; mergekit YAML too
    rayalign train salsa --config salsa.yaml reference.models=[SFT0,SFT1]   # or: train ppo
    rayalign expo sft=SFT_DIR aligned=DPO_DIR output=DIR reward.model=RM_DIR   # alpha searched on dev prompts
    rayalign soups policy=SFT_DIR output=DIR objectives=[informative,concise]     # soups' fronts, hypervolume
    rayalign serve --config serve.yaml   # OpenAI-compatible Ray Serve app over personalised merges
    rayalign eval models=[A,B] split=test

Training commands take an optional --config YAML plus dotted overrides (key.sub=value); the
resolved config is saved in the output directory.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from rayalign.config.core import ConfigError, load_config
from rayalign.config.schema import EvalConfig, PretrainConfig, RMConfig, SFTConfig
from rayalign.utils.logging import setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rayalign: Ray-distributed RLHF and model soups. Start with `rayalign demo`.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
Overrides = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. learner.lr=1e-4 seeds=[0,1]")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue an interrupted run in the same output")]


def _fail(exc: BaseException) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[BaseException], ...]:
    from rayalign.data.loaders import DatasetSourceError
    from rayalign.data.schema import DatasetRowError
    from rayalign.models.checkpoint import CheckpointError
    from rayalign.utils.io import OutputExistsError

    return (ConfigError, OutputExistsError, CheckpointError, DatasetRowError, DatasetSourceError, FileNotFoundError)


def _run(fn, *args, **kw):  # type: ignore[no-untyped-def]
    setup_logging()
    try:
        return fn(*args, **kw)
    except _user_errors() as exc:
        _fail(exc)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="tiny preset and little data (for tests)")] = False,
    resume: ResumeOpt = False,
) -> None:
    """The end-to-end demo on the embedded synthetic task; writes OUT/report.md."""
    from rayalign.recipes.demo import run_demo

    summary = _run(run_demo, out, quick=quick, resume=resume)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"wall time {summary['wall_time_s']:.0f}s; run directory {out}")


@app.command()
def presets(
    out: Annotated[Path, typer.Argument(help="directory to create (OUT/tiny, OUT/small)")],
    seed: int = 0,
) -> None:
    """Train the world's tokenizer and save randomly initialised tiny/small Llama presets."""
    from rayalign.models.presets import build_presets
    from rayalign.utils.io import OutputExistsError

    if out.exists():
        _fail(OutputExistsError(f"output directory already exists: {out}"))
    paths = _run(build_presets, out, seed)
    for name, p in paths.items():
        typer.echo(f"{name}: {p}")


@app.command()
def world(
    out: Annotated[Path, typer.Argument(help="directory to create with the world's JSONL files")],
    seed: int = 0,
    noise: Annotated[float, typer.Option(help="Bradley-Terry label noise (temperature)")] = 0.0,
) -> None:
    """Export the synthetic world (prompt splits, SFT demonstrations, preference pairs) as JSONL."""
    from rayalign.utils.io import atomic_dir
    from rayalign.world import build
    from rayalign.world.gold import OBJECTIVES

    def export() -> None:
        splits = build.split_prompts(seed)
        with atomic_dir(out) as tmp:
            for name, prompts in splits.items():
                build.prompt_dataset(prompts).to_json(tmp / f"prompts_{name}.jsonl")
                build.sft_dataset(prompts, 4, seed).to_json(tmp / f"sft_{name}.jsonl")
                build.preference_dataset(prompts, [0.6, 0.2, 0.2], 4, noise, seed).to_json(tmp / f"prefs_{name}.jsonl")
            (tmp / "README.txt").write_text(f"rayalign synthetic world, seed {seed}, objectives {OBJECTIVES}\n")

    _run(export)
    typer.echo(f"wrote {out}")


@app.command()
def convert(
    dataset: Annotated[str, typer.Argument(help="the layout to convert: pku-saferlhf")],
    out: Annotated[Path, typer.Argument(help="directory to create (must not exist)")],
    source: Annotated[str, typer.Option(help="hub name or local .jsonl/.parquet file")] = "PKU-Alignment/PKU-SafeRLHF",
    split: str = "train",
    limit: Annotated[int | None, typer.Option(help="convert only the first N rows")] = None,
) -> None:
    """Convert a multi-objective preference set into one UltraFeedback-layout file per objective
    (for `rayalign rm`) plus the prompts (for `rayalign train`). PKU-SafeRLHF: helpful and harmless."""
    from rayalign.data.converters import convert_pku_saferlhf

    if dataset != "pku-saferlhf":
        _fail(ConfigError(f"unknown dataset layout {dataset!r}; supported: pku-saferlhf"))
    counts = _run(convert_pku_saferlhf, source, split, out, limit)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} {v} rows" for k, v in counts.items()))


@app.command()
def pretrain(config: ConfigOpt = None, overrides: Overrides = None, resume: ResumeOpt = False) -> None:
    """Pre-train a base model on the world's unlabelled corpus (keys: model, output, ...)."""
    from rayalign.recipes.supervised import run_pretrain

    cfg = _run(load_config, PretrainConfig, config, overrides or [])
    typer.echo(f"wrote {_run(run_pretrain, cfg, resume=resume)}")


@app.command()
def sft(config: ConfigOpt = None, overrides: Overrides = None, resume: ResumeOpt = False) -> None:
    """Train one SFT model per seed from one base (SALSA needs >= 2): OUTPUT/sft-SEED."""
    from rayalign.recipes.supervised import run_sft

    cfg = _run(load_config, SFTConfig, config, overrides or [])
    for p in _run(run_sft, cfg, resume=resume):
        typer.echo(f"wrote {p}")


@app.command()
def rm(config: ConfigOpt = None, overrides: Overrides = None, resume: ResumeOpt = False) -> None:
    """Train a Bradley-Terry reward model (scalar head; objectives=each for one head per objective)."""
    from rayalign.recipes.supervised import run_rm

    cfg = _run(load_config, RMConfig, config, overrides or [])
    path = _run(run_rm, cfg, resume=resume)
    typer.echo(f"wrote {path}; held-out accuracy {json.loads((path / 'rayalign.json').read_text())['heldout_accuracy']}")


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="merge YAML: rayalign's spec or mergekit's (linear, task_arithmetic)")],
    out: Annotated[Path, typer.Argument(help="output model directory (must not exist)")],
    overrides: Overrides = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> None:
    """Merge models: linear soups (negative weights allowed), task arithmetic, ExPO, Bone Soups."""
    from rayalign.merge.engine import merge_to_disk
    from rayalign.merge.spec import load_spec

    def run():  # type: ignore[no-untyped-def]
        return merge_to_disk(load_spec(config, overrides or []), out, progress=not quiet)

    try:
        report = _run(run)
    except ValueError as exc:  # MergeValidationError, MergeInputError and spec errors are ValueErrors
        _fail(exc)
    typer.echo(f"merged {report.tensors} tensors ({report.bytes_read / 1e6:.1f} MB read, "
               f"{report.bytes_written / 1e6:.1f} MB written) in {report.seconds:.1f}s into {out}")
    typer.echo(f"coefficients on {report.inputs}: {[round(c, 6) for c in report.coefficients]}")


def _train_methods() -> dict[str, str]:
    """`rayalign train` methods from the registries: ppo and salsa (PPO with GAE, pi_ref SFT or a soup),
    one per critic-free advantage estimator (rayalign.losses.advantages) and one per preference loss
    (rayalign.losses.preference)."""
    from rayalign.losses.advantages import critic_free_estimators
    from rayalign.losses.preference import PREFERENCE_LOSSES

    return {m: m for m in ("ppo", "salsa", *critic_free_estimators(), *PREFERENCE_LOSSES)}


Method = Enum("Method", _train_methods(), type=str)  # type: ignore[misc]


@app.command()
def train(
    method: Annotated[Method, typer.Argument(
        help="ppo: PPO with the SFT model as reference; salsa: PPO with a soup reference; grpo / dr_grpo / rloo "
             "/ reinforce_pp (any registered advantage estimator): critic-free, with any reference "
             "(reference.models=[A,B] for a soup); spo: soft preference optimisation with an online global KL; "
             "dpo / ipo (any registered preference loss): the offline baselines on the same pairs")],
    config: ConfigOpt = None, overrides: Overrides = None, resume: ResumeOpt = False,
) -> None:
    """RLHF and preference optimisation on Ray (rollout, reward, reference and learner actors). Starts
    a local Ray, or joins RAY_ADDRESS / ray_address=..., so it also runs unchanged under `ray job submit`."""
    from rayalign.config.schema import PrefConfig, RLConfig
    from rayalign.distributed.placement import PlacementError

    from rayalign.losses.preference import PREFERENCE_LOSSES

    if method.value not in PREFERENCE_LOSSES:
        from rayalign.recipes.ppo import ESTIMATOR_METHODS
        from rayalign.recipes.ppo import run_rl as run
        # `train grpo` is `algo.estimator=grpo`, validated with the config (a later override still wins,
        # and run_rl then names the conflict)
        implied = [f"algo.estimator={method.value}"] if method.value in ESTIMATOR_METHODS else []
        cfg = _run(load_config, RLConfig, config, implied + (overrides or []))
    else:
        from rayalign.recipes.preference import run_preference as run
        cfg = _run(load_config, PrefConfig, config, overrides or [])
    try:
        path = _run(run, cfg, method.value, resume=resume)
    except (ValueError, PlacementError) as exc:
        _fail(exc)
    typer.echo(f"wrote {path}")


@app.command()
def expo(config: ConfigOpt = None, overrides: Overrides = None, resume: ResumeOpt = False) -> None:
    """ExPO: theta_2 = theta_1 + alpha (theta_1 - theta_0), alpha chosen on dev prompts by a reward model.
    Writes OUTPUT/model, OUTPUT/expo.json (reward against alpha) and OUTPUT/reward_vs_alpha.png."""
    from rayalign.config.schema import ExpoConfig
    from rayalign.merge.engine import MergeValidationError
    from rayalign.merge.io import MergeInputError
    from rayalign.recipes.expo import run_expo

    cfg = _run(load_config, ExpoConfig, config, overrides or [])
    try:
        result = _run(run_expo, cfg, resume=resume)
    except (MergeValidationError, MergeInputError, ValueError) as exc:
        _fail(exc)
    for p in result["curve"]:
        typer.echo(f"alpha {p['alpha']:.2f}: dev reward {p['reward']:.4f} ± {p['reward_se']:.4f}"
                   + (f", gold {p['gold']:.4f}" if "gold" in p else ""))
    typer.echo(f"chosen alpha {result['alpha']}; wrote {Path(cfg.output) / 'model'}")


@app.command()
def soups(config: ConfigOpt = None, overrides: Overrides = None, resume: ResumeOpt = False) -> None:
    """Rewarded, Bone and Personalized Soups and Prompted-MORL: their PPO runs on Ray, then gold fronts over a
    preference grid with hypervolume and controllability. Writes OUTPUT/report.md and OUTPUT/results.json."""
    from rayalign.config.schema import SoupsConfig
    from rayalign.distributed.placement import PlacementError
    from rayalign.recipes.soups import render, run_soups

    cfg = _run(load_config, SoupsConfig, config, overrides or [])
    try:
        result = _run(run_soups, cfg, resume=resume)
    except (ValueError, PlacementError) as exc:
        _fail(exc)
    typer.echo(render(result))


@app.command("serve")
def serve_(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Serve personalised merged models with an OpenAI-compatible API on Ray Serve (POST /v1/chat/completions,
    /v1/completions; GET /v1/models, /health, /ready). A request names a family and a preference vector
    (extra body field `preference`) or a named soup (`model: family/soup`). Blocks until interrupted."""
    import time

    from ray import serve

    from rayalign.config.schema import ServeConfig
    from rayalign.distributed.cluster import connect
    from rayalign.serve.app import build_app

    if config is None:
        _fail(ConfigError("rayalign serve needs --config serve.yaml (model_store and families)"))
    cfg = _run(load_config, ServeConfig, config, overrides or [])
    try:
        app = build_app(cfg)  # checks the config before Ray and Serve start: a bad store path is named here
    except ValueError as exc:
        _fail(exc)
    connect()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        _run(serve.run, app, name="rayalign", route_prefix="/")
    except ValueError as exc:
        _fail(exc)
    typer.echo(f"serving {[f.name for f in cfg.families]} at http://{cfg.host}:{cfg.port}/v1 (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


@app.command("eval")
def eval_(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Sample every model on the same prompts and score them: the world's held-out prompts with gold rewards,
    or a prompt set with reward models (prompts.source=... reward.kind=model reward.model=RM). One JSON line
    per model: mean and standard error per objective, win rate against the first model."""
    from rayalign.data.loaders import load_rows
    from rayalign.eval.gold import evaluate, win_rate
    from rayalign.models.checkpoint import load_causal_lm
    from rayalign.reward.scorer import RewardScorer
    from rayalign.utils.device import place
    from rayalign.world.build import split_prompts

    cfg = _run(load_config, EvalConfig, config, overrides or [])
    if cfg.prompts.source == "world":
        prompts = split_prompts(cfg.seed)[cfg.split][: cfg.limit]
    else:
        prompts = list(_run(load_rows, cfg.prompts.source, "prompt", cfg.prompts.split, cfg.prompts.limit)["prompt"])
    scorer = None if cfg.reward.kind == "gold" else _run(RewardScorer, "model", cfg.reward.model, cfg.reward.weights)
    results = []
    for path in cfg.models:
        model, tok = _run(load_causal_lm, path)
        results.append(evaluate(path, place(model), tok, prompts, n=cfg.samples_per_prompt,
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                weights=cfg.weights, scorer=scorer))
        del model
    for r in results:
        row = r.summary()
        row["win_rate_vs_first"] = win_rate(r, results[0])
        typer.echo(json.dumps(row))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
