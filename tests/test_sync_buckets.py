"""Weight-sync buckets: exact round trip, dtype boundaries, size limit, few buckets per model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rayalign.sync.buckets import bucketize, unbucketize


def test_round_trip_is_exact_and_bounded():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=128, tie_word_embeddings=False))
    named = list(model.named_parameters())
    total = sum(p.numel() * 4 for _, p in named)
    buckets = list(bucketize(named, bucket_bytes=total // 3))
    assert 3 <= len(buckets) <= 5  # a handful of transfers, not one per tensor (there are 21)
    for meta, flat in buckets:
        assert flat.numel() * 4 <= total // 3 or len(meta.names) == 1
    got = dict(kv for meta, flat in buckets for kv in unbucketize(meta, flat))
    assert list(got) == [n for n, _ in named]
    for n, p in named:
        assert torch.equal(got[n], p.detach())


def test_dtypes_never_share_a_bucket_and_bad_buffers_are_refused():
    named = [("a", torch.ones(3)), ("b", torch.ones(2, dtype=torch.bfloat16)), ("c", torch.zeros(4))]
    buckets = list(bucketize(named))
    assert [m.names for m, _ in buckets] == [("a",), ("b",), ("c",)]
    big = [("x", torch.ones(10)), ("y", torch.ones(100)), ("z", torch.ones(1))]
    assert [m.names for m, _ in bucketize(big, bucket_bytes=48)] == [("x",), ("y",), ("z",)]
    meta, flat = buckets[0]
    with pytest.raises(ValueError, match="bucket buffer has 2"):
        list(unbucketize(meta, flat[:2]))
