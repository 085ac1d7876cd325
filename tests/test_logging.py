"""Run logging: metrics.jsonl and TensorBoard always, Weights & Biases offline when asked for (no
network), nothing of wandb when it is not."""

import glob
import json
import sys

import pytest

from rayalign.config.core import ConfigError, load_config
from rayalign.config.schema import RLConfig, WandbConfig
from rayalign.utils.logging import RunLogger


def test_wandb_offline_run_beside_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunLogger(tmp_path / "logs", "policy/", wandb=WandbConfig(enabled=True, project="t"),
                       run_config={"algo": {"beta": 0.05}}, name="grpo-test")
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step, "note": "text is kept out of the scalars"})
    run = logger.wandb_run
    assert run.name == "grpo-test" and run.config["algo"]["beta"] == 0.05
    assert run.summary["policy/loss"] == pytest.approx(1.0 / 2)  # a step's row is committed when the next starts
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["policy/loss"] == pytest.approx(1 / 3)
    assert glob.glob(str(tmp_path / "logs" / "tensorboard" / "events.out.tfevents.*"))
    files = glob.glob(str(tmp_path / "logs" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    data = open(files[0], "rb").read()
    assert b"policy/loss" in data and b"grpo-test" in data  # the history and the run's name are in the record log


def test_no_wandb_unless_asked_and_a_clear_error_when_missing(tmp_path, monkeypatch):
    logger = RunLogger(tmp_path / "logs", "", wandb=WandbConfig())  # the default: off
    logger.log(1, {"x": 1.0})
    logger.close()
    assert logger.wandb_run is None and not (tmp_path / "logs" / "wandb").exists()
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(ConfigError, match="wandb.enabled=true, but wandb is not installed"):
        load_config(RLConfig, None, ["policy=p", "output=o", "wandb.enabled=true"])
    assert load_config(RLConfig, None, ["policy=p", "output=o"]).wandb.enabled is False
