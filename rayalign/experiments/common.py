"""What the multi-seed experiments share: their command line around a finished demo run, and
writing their report."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rayalign.eval.gold import score as gold_score
from rayalign.eval.merged import sample_flat
from rayalign.reward.scorer import RewardScorer
from rayalign.utils.io import atomic_write_json, atomic_write_text
from rayalign.world.build import split_prompts


def mean_se(xs: list[float]) -> list[float]:
    """[mean, standard error] over seeds (0 for a single seed)."""
    return [float(np.mean(xs)), float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0]


def ints(text: str) -> list[int]:
    """A comma-separated command-line list of ints ("0,1,2")."""
    return [int(x) for x in text.split(",") if x]


def floats(text: str) -> list[float]:
    """A comma-separated command-line list of floats ("0.1,0.3")."""
    return [float(x) for x in text.split(",") if x]


def demo_parser(doc: str, needs: str) -> argparse.ArgumentParser:
    """--demo (a finished `rayalign demo` run holding `needs`), --out, --seeds."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, required=True, help=f"a demo run directory (with {needs})")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=ints, default=[0, 1, 2],
                   help="comma-separated (default 0,1,2)")
    return p


def check_demo(p: argparse.ArgumentParser, demo: Path, needs: str) -> None:
    if not (demo / needs).is_dir():
        p.error(f"--demo {demo}: no {needs} inside (run `rayalign demo` first)")


def command_line() -> str:
    """How this process was started, as a command to rerun it (`python -m module args`)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])


def write_report(out: Path, results: dict[str, Any], text: str) -> None:
    """results.json and report.md, both stating the command that made them."""
    command = command_line()
    atomic_write_json(out / "results.json", {**results, "command": command})
    title, _, rest = text.partition("\n")
    text = f"{title}\n\nCommand: `{command}`\n{rest}"
    atomic_write_text(out / "report.md", text)
    print(text)


class Judge:
    """Gold and reward-model scores of a model's samples on the test prompts (same seeds for all)."""

    def __init__(self, rm: Path, samples: int, max_new_tokens: int = 40):
        self.prompts = split_prompts(0)["test"]
        self.rm = RewardScorer("model", str(rm))
        self.samples, self.max_new_tokens = samples, max_new_tokens

    def __call__(self, model: Any, tok: Any, name: str) -> dict[str, float]:
        flat_p, flat_r = sample_flat(model, tok, self.prompts, self.samples, self.max_new_tokens, seed=1234)
        n = self.samples
        responses = [flat_r[i * n:(i + 1) * n] for i in range(len(self.prompts))]
        g = gold_score(name, self.prompts, responses).summary()
        rm = self.rm.score(flat_p, flat_r)["combined"].reshape(len(self.prompts), n).mean(1)
        return {"gold": g["combined"], "gold_se": g["combined_se"], "rm": float(rm.mean()),
                "rm_se": float(rm.std(ddof=1) / np.sqrt(len(rm))), "words": g["mean_words"]}
