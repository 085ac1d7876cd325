"""What every learner rank holding a policy shares, whatever it trains it with (PPO's actor-critic
rank, the preference rank of SPO/DPO/IPO): where it can be reached, the policy's weights going
out to the rollout workers (object store or collective broadcast), its run state and the final
checkpoint. No Ray in here; `rayalign.learner.group.RankGroup` wraps ranks in actors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rayalign.learner.dist import free_port
from rayalign.learner.engine import Learner
from rayalign.models.lora import file_name
from rayalign.sync.buckets import BucketMeta, bucketize


class PolicyRank:
    """Subclasses set `self.actor` (the policy's Learner), `self.tokenizer`, `self.rank` and put
    every Learner whose state must survive a resume into `self.learners` (name -> Learner)."""

    def __init__(self) -> None:
        self.rank = 0
        self.actor: Learner | None = None
        self.learners: dict[str, Learner] = {}
        self.group: Any = None

    def address(self) -> tuple[str, int]:
        """Where this rank can be reached (rank 0 hosts the group's rendezvous)."""
        try:
            import ray

            ip = ray.util.get_node_ip_address()
        except Exception:
            ip = "127.0.0.1"
        return ip, free_port()

    def setup_at(self, rank: int, world_size: int, address: tuple[str, int], **kwargs: Any) -> None:
        """`setup(rank, world_size, *address, **kwargs)`: the rendezvous address as one value, so a
        group can pass rank 0's `address()` result along without waiting for it."""
        self.setup(rank, world_size, address[0], address[1], **kwargs)  # type: ignore[attr-defined]

    # ---- weights out -----------------------------------------------------------------------
    def _weights_out(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What a sync sends: a LoRA policy's adapter tensors only, else every weight."""
        assert self.actor is not None
        return self.actor.iter_adapter_params() if self.actor.is_lora else self.actor.iter_full_params()

    def bucket_metas(self, bucket_bytes: int) -> list[BucketMeta]:
        """The bucket layout of the policy weights (shapes only; no gathering)."""
        assert self.actor is not None
        lora = self.actor.is_lora
        named = ((file_name(n) if lora else n,
                  torch.empty(tuple(getattr(p, "ds_shape", p.shape)), dtype=p.dtype, device="meta"))
                 for n, p in self.actor.module.named_parameters() if p.requires_grad or not lora)
        return [m for m, _ in bucketize(named, bucket_bytes, allocate=False)]

    def publish_buckets(self, bucket_bytes: int) -> tuple[list[BucketMeta], list[Any], int] | None:
        """Collective over the learner ranks; rank 0 puts the buckets into the object store."""
        import ray

        assert self.actor is not None
        metas, refs, nbytes = [], [], 0
        for meta, flat in bucketize(self._weights_out(), bucket_bytes):
            if self.rank == 0:
                metas.append(meta)
                refs.append(ray.put(flat))
                nbytes += flat.numel() * flat.element_size()
        return (metas, refs, nbytes) if self.rank == 0 else None

    def join_weight_group(self, addr: str, port: int, world_size: int, backend: str,
                          timeout_s: float = 300.0) -> None:
        from rayalign.sync.collective import CollectiveGroup

        if self.rank != 0:
            raise RuntimeError("only learner rank 0 joins the weight-sync group")
        if self.group is not None:
            self.group.close()
        self.group = CollectiveGroup.join(addr, port, 0, world_size, backend, timeout_s)

    def broadcast_weights(self, bucket_bytes: int) -> tuple[int, int]:
        """Collective over the learner ranks (ZeRO-3 gathers); rank 0 broadcasts to the workers."""
        assert self.actor is not None
        buckets = bucketize(self._weights_out(), bucket_bytes)
        if self.rank != 0:
            for _ in buckets:
                pass
            return 0, 0
        if self.group is None:
            raise RuntimeError("broadcast_weights before join_weight_group")
        return self.group.send(buckets)

    # ---- run state -------------------------------------------------------------------------
    def save_state(self, directory: str, client_state: dict[str, Any], tag: str) -> None:
        for name, learner in self.learners.items():
            learner.save_state(Path(directory) / name, client_state, tag)

    def load_state(self, directory: str, tag: str) -> dict[str, Any] | None:
        clients = [learner.load_state(Path(directory) / name, tag) for name, learner in self.learners.items()]
        return clients[0] if clients else None

    def save_policy(self, out: str, extra: dict[str, Any] | None = None) -> str:
        assert self.actor is not None
        self.actor.save_pretrained(out, self.tokenizer, extra=extra)
        return out
