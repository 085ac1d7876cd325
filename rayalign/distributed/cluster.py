"""Connecting to Ray: join the cluster of `ray job submit` (RAY_ADDRESS) or a given address, or
start a local one. The environment rayalign's workers need is passed on in the runtime_env."""

from __future__ import annotations

import json
import os

import ray

from rayalign.utils.logging import log

# variables the actors must see as the driver does (DeepSpeed, vLLM CPU, caches, offline hub)
FORWARDED_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE",
                 "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "HF_HOME", "PYTHONPATH")


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Make sure Ray is initialised; returns True when this call started it (so the caller
    shuts it down), False when it joined an existing session or cluster."""
    if ray.is_initialized():
        return False
    taken = _job_env_vars()  # a submitted job's own runtime_env already reaches every worker
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in taken}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=True)
        return False
    log.info("starting a local Ray (%s CPUs)", num_cpus or "all")
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env})
    return True


def _job_env_vars() -> set[str]:
    """Variables the runtime_env of `ray job submit` sets. Ray refuses a driver runtime_env that
    sets one of them again, so the driver forwards only the others."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()
