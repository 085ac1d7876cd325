"""Environment defaults for a laptop-class CPU machine (tests, benchmarks): DeepSpeed's compiled
ops cached in the checkout, vLLM's fast in-process start with a small KV cache, no hub access."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_defaults(root: str | Path) -> None:
    """Set (without overriding what the user set) the variables the Makefile exports."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(root) / ".cache" / "torch_extensions"))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
