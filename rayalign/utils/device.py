"""Where inference-only workers (reference, reward scorers) put their model: the GPU Ray gave
the actor when it has one (Ray sets CUDA_VISIBLE_DEVICES per actor), else the CPU. The same code
runs in CPU tests and on GPU clusters; only these two choices differ.

    device, dtype = accelerator(), resolve_dtype("auto")   # cuda + bfloat16, or cpu + float32
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def accelerator() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """'auto': bfloat16 on a GPU, float32 on the CPU (the CPU learner computes in float32)."""
    if name == "auto":
        return torch.bfloat16 if (device or accelerator()).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def place(model: torch.nn.Module, dtype: str = "auto") -> torch.nn.Module:
    """Move an inference model to this actor's accelerator in the chosen dtype."""
    device = accelerator()
    return model.to(device=device, dtype=resolve_dtype(dtype, device))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
