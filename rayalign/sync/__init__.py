"""Weight sync learner -> rollout workers, as a registry of kinds behind one protocol.

    sync = make_sync("collective", learners, workers, bucket_bytes=64 << 20, gpus=False, timeout_s=120)
    stats = sync.push()                 # the learner's current weights to every worker, timed
    sync.resync(i)                      # worker i restarted: bring it to the current weights
    sync.recover(back)                  # a push failed; `back` = the workers the pool restarted since

- object_store  one `ray.put` per bucket, one call per worker (rayalign.sync.object_store)
- collective    a bucketed broadcast in a gloo (CPU) / NCCL (GPU) group of learner rank 0 and the
                workers, bounded by a timeout and re-formed after a member dies (rayalign.sync.collective)

Register another with `@register_sync("name")` on a factory with make_sync's arguments.
"""

from rayalign.sync.base import SYNC_KINDS, SyncStats, WeightSync, WeightSyncError, make_sync, register_sync, sync_kinds

__all__ = ["SYNC_KINDS", "SyncStats", "WeightSync", "WeightSyncError", "make_sync", "register_sync", "sync_kinds"]
