"""Serving's pure parts: the byte-bounded LRU of merged weights and the mapping from a request's
preference vector (or named soup) to merge coefficients, with its errors."""

import asyncio
import shutil

import numpy as np
import pytest
import torch

from rayalign.config.schema import FamilyConfig
from rayalign.serve.cache import ByteLRU, state_dict_bytes
from rayalign.serve.families import Family, PreferenceError, in_store, quantise


def test_lru_is_bounded_in_bytes_and_evicts_least_recent():
    c = ByteLRU(100)
    assert c.put("a", "A", 40) and c.put("b", "B", 40)
    assert c.get("a") == "A"  # a is now the most recent
    assert c.put("c", "C", 40)  # evicts b, not a
    assert "b" not in c and c.get("a") == "A" and c.get("c") == "C" and c.bytes == 80
    assert not c.put("huge", "H", 101) and "huge" not in c and c.bytes == 80  # larger than the cache: not kept
    assert c.put("a", "A2", 90) and c.get("a") == "A2" and len(c) == 1 and c.bytes == 90  # refresh re-sizes
    assert c.get("zzz") is None
    s = c.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (4, 1, 2) and s["hit_rate"] == pytest.approx(0.8)
    assert state_dict_bytes({"w": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)}) == 48 + 10
    with pytest.raises(ValueError):
        ByteLRU(-1)


def test_quantise_keeps_the_simplex():
    assert quantise(np.array([0.72, 0.28]), 20).tolist() == [0.7, 0.3]
    q = quantise(np.array([1 / 3, 1 / 3, 1 / 3]), 10)
    assert q.sum() == pytest.approx(1.0) and sorted(q.tolist()) == [0.3, 0.3, 0.4]
    assert quantise(np.array([1.0, 0.0]), 7).tolist() == [1.0, 0.0]


def _family(tmp_path, **kw):
    for m in ("a", "b", "sft"):
        (tmp_path / m).mkdir(exist_ok=True)
    cfg = FamilyConfig(name="demo-soup", models=["a", "b"], objectives=["informative", "concise"],
                       soups={"terse": [0.2, 0.8]}, **kw)
    return Family(cfg, tmp_path, grid=20)


def test_linear_family_maps_preferences_to_coefficients(tmp_path):
    fam = _family(tmp_path)
    assert fam.resolve(preference=[0.72, 0.28]) == ("demo-soup@20:14,6", [0.7, 0.3])
    assert fam.resolve(preference=[3, 1]) == ("demo-soup@20:15,5", [0.75, 0.25])  # normalised to the simplex
    assert fam.resolve(soup="terse") == ("demo-soup@20:4,16", [0.2, 0.8])
    assert fam.sources() == [tmp_path.resolve() / "a", tmp_path.resolve() / "b"]
    for bad, match in [([0.5], "takes a preference vector of 2 weights"), ([float("nan"), 1], "finite"),
                       ([float("inf"), 1], "finite"), ([-0.5, 1.5], "no negative"), ([0, 0], "not all be zero")]:
        with pytest.raises(PreferenceError, match=match):
            fam.resolve(preference=bad)
    with pytest.raises(PreferenceError, match=r"has no soup 'sweet'; it has \['terse'\]"):
        fam.resolve(soup="sweet")
    with pytest.raises(PreferenceError, match="either a preference vector or a soup name"):
        fam.resolve()


def test_bone_soup_family_uses_lambda_and_the_sft_anchor(tmp_path):
    fam = _family(tmp_path, kind="bone_soup", beta=0.7, base_model="sft", k=1.2)
    key, coefs = fam.resolve(preference=[1.0, 0.0])
    assert key == "demo-soup@20:20,0"
    assert coefs == pytest.approx([1.2 * 1.75, 1.2 * -0.75, -0.2])  # k * B^-1 mu, then 1 - k on SFT
    assert fam.sources()[-1] == tmp_path.resolve() / "sft"


def test_model_store_paths_cannot_escape(tmp_path):
    (tmp_path / "store").mkdir()
    assert in_store(tmp_path / "store", "x/y") == (tmp_path / "store" / "x" / "y").resolve()
    for bad in ("../secret", "/etc/passwd", "x/../../secret"):
        with pytest.raises(PreferenceError, match="outside the model store"):
            in_store(tmp_path / "store", bad)
    (tmp_path / "store" / "link").symlink_to(tmp_path)
    with pytest.raises(PreferenceError, match="outside the model store"):
        in_store(tmp_path / "store", "link/anything")


def test_family_config_errors():
    with pytest.raises(ValueError, match="2 objectives for 3 models"):
        FamilyConfig(name="f", models=["a", "b", "c"], objectives=["x", "y"])
    with pytest.raises(ValueError, match="bone_soup needs beta"):
        FamilyConfig(name="f", kind="bone_soup", models=["a", "b"], objectives=["x", "y"])
    with pytest.raises(ValueError, match="'expo' is not a merge method that takes a preference; use one of "
                                         "\\['linear', 'bone_soup'\\]"):
        FamilyConfig(name="f", kind="expo", models=["a", "b"], objectives=["x", "y"])
    with pytest.raises(ValueError, match="soup 's' has 1 weights"):
        FamilyConfig(name="f", models=["a", "b"], objectives=["x", "y"], soups={"s": [1.0]})
    with pytest.raises(ValueError, match="name"):
        FamilyConfig(name="../evil", models=["a", "b"], objectives=["x", "y"])


def test_merge_keys_name_their_merge_exactly():
    from rayalign.serve.families import parse_key

    assert parse_key("demo-soup@20:14,6") == ("demo-soup", 20, [14, 6])
    assert parse_key("a@b@3:1,2") == ("a@b", 3, [1, 2])
    for bad in ("demo-soup", "demo-soup@20", "demo-soup@x:1,2", "demo-soup@20:1,x"):
        with pytest.raises(PreferenceError, match="malformed model key"):
            parse_key(bad)


def test_requests_for_the_loaded_key_go_first_but_cannot_starve_others():
    from rayalign.serve.server import pick_next

    assert pick_next(["b", "a", "a"], "a", streak=1, max_streak=8) == 1  # no swap needed
    assert pick_next(["b", "c"], "a", streak=1, max_streak=8) == 0  # the oldest
    assert pick_next(["b", "a"], "a", streak=8, max_streak=8) == 0  # a ran 8 times in a row: b's turn
    assert pick_next(["a", "a"], "a", streak=20, max_streak=8) == 0  # nobody else waits
    assert pick_next(["b"], None, streak=0, max_streak=8) == 0


def test_overflowing_and_typed_preferences(tmp_path):
    fam = _family(tmp_path)
    assert fam.resolve(preference=[1e308, 1e308]) == ("demo-soup@20:10,10", [0.5, 0.5])  # not [0.05, 0.05]
    assert fam.resolve(preference=[1e308, 0]) == ("demo-soup@20:20,0", [1.0, 0.0])
    assert fam.resolve(preference=[1e-300, 3e-300]) == ("demo-soup@20:5,15", [0.25, 0.75])


def test_stream_pieces_spell_the_whole_text_with_multibyte_characters(tokenizer_and_preset):
    """Byte-level BPE splits these characters over several tokens; decoding growing prefixes would
    emit U+FFFD for good, the incremental decoder holds the bytes back."""
    from rayalign.serve.text import completion_logprobs, render_choice, token_deltas

    tok, _ = tokenizer_and_preset
    text = " héllo wörld 日本語 🙂 the fox . "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # several tokens per multi-byte character
    deltas = token_deltas(tok, ids)
    assert "".join(deltas) == tok.decode(ids) and not any("\ufffd" in d for d in deltas)
    c = render_choice(tok, ids + [tok.eos_token_id], finished=True)
    assert c.text == text.strip() and "".join(p.text for p in c.pieces) == c.text and c.finish == "stop"
    # a stop string cuts both, and what comes after it (text and log-probs) is dropped
    lps = [{t: -0.5, 0: -2.0} for t in ids] + [{tok.eos_token_id: -0.1}]
    c = render_choice(tok, ids + [tok.eos_token_id], finished=True, stops=["fox", "日本"], logprobs=lps, top=1)
    assert c.text == "héllo wörld " and "".join(p.text for p in c.pieces) == c.text and c.finish == "stop"
    assert sum(len(p.logprobs) for p in c.pieces) == len(c.logprobs) < len(ids)
    assert all(e["logprob"] == -0.5 and len(e["top_logprobs"]) == 1 for e in c.logprobs)
    assert c.logprobs[0]["top_logprobs"][0]["logprob"] == -0.5
    legacy = completion_logprobs(c)
    assert len(legacy["tokens"]) == len(legacy["text_offset"]) == len(c.logprobs)
    # bytes that never complete a character are shown as decode shows them, at the end
    cut = ids[:3] + tok(" 日", add_special_tokens=False)["input_ids"][:2]
    assert "".join(token_deltas(tok, cut)) == tok.decode(cut)
    c = render_choice(tok, ids, finished=False, stops=[])
    assert c.finish == "length" and c.logprobs is None


def test_request_parsing_refuses_what_it_does_not_implement():
    from rayalign.serve import openai_api as oa

    def parse(body):
        import json
        return oa.parse(oa.ChatRequest, json.dumps(body).encode())

    ok = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                                 "text": "b"}]}]}
    req = parse({**ok, "seed": 2**64 - 1, "stop": "x", "user": "u", "tool_choice": "none", "response_format":
                 {"type": "text"}, "presence_penalty": 0})
    assert req.messages[0].text() == "ab" and req.stops() == ["x"] and req.logprob_count() is None
    assert parse({**ok, "logprobs": True, "top_logprobs": 3}).logprob_count() == 3
    for extra, match in [({"seed": 2**64}, "seed"), ({"logit_bias": {"1": 5}}, "logit_bias"),
                         ({"stop": [""]}, "non-empty"), ({"preference": ["0.5", 1]}, "preference.0"),
                         ({"messages": [{"role": "user", "content": "\ud800"}]}, "not valid Unicode")]:
        with pytest.raises(oa.APIError, match=match) as err:
            parse({**ok, **extra})
        assert err.value.status == 400


def test_streamed_completion_logprobs_count_offsets_from_the_start(tokenizer_and_preset):
    import json

    from rayalign.serve import openai_api as oa
    from rayalign.serve.text import completion_logprobs, render_choice

    tok, _ = tokenizer_and_preset
    ids = tok(" the fox lives in the forest .", add_special_tokens=False)["input_ids"]
    c = render_choice(tok, ids, finished=False, logprobs=[{t: -1.0} for t in ids], top=0)
    events = [json.loads(e[6:]) for e in oa.completion_chunks("m", [c]) if e.startswith("data: {")]
    offsets = [o for e in events if e["choices"][0]["logprobs"] for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == completion_logprobs(c)["text_offset"] and offsets[0] == 0 and offsets == sorted(set(offsets))


def test_streaming_a_choice_token_by_token_gives_the_whole_answers_pieces(tokenizer_and_preset):
    """ChoiceStream fed one token at a time (as vLLM streams) sends only final text, and what it
    sends, text and log-probs, is the non-streamed answer's: over random texts, stop strings that
    straddle tokens, leading and trailing whitespace and multi-byte characters."""
    import random

    from rayalign.serve.text import ChoiceStream, render_choice

    tok, _ = tokenizer_and_preset
    rng = random.Random(0)
    words = ["the", "fox", " ", "  ", "\n", "lives", "in", "日本", "ö", ".", "forest", "🙂", "x"]
    for case in range(200):
        text = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(0, 12)))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if rng.random() < 0.5:
            ids = ids + [tok.eos_token_id]
        stops = rng.sample(["fox", "s in", " .", "\n", "日", "ores", "zzz"], rng.randint(0, 3))
        lps = [{t: -0.1 * (i + 1)} for i, t in enumerate(ids)]
        whole = render_choice(tok, ids, finished=ids[-1:] == [tok.eos_token_id], stops=stops, logprobs=lps, top=0)
        stream = ChoiceStream(tok, stops, top=0)
        sent = []
        for t, lp in zip(ids, lps):
            for piece in stream.feed([t], [lp]):
                assert whole.text.startswith("".join(p.text for p in sent) + piece.text), (case, text, stops)
                sent.append(piece)
        tail, choice = stream.finish(ids[-1:] == [tok.eos_token_id])
        sent += tail
        assert "".join(p.text for p in sent) == whole.text == choice.text, (case, text, stops)
        assert [e for p in sent for e in p.logprobs] == whole.logprobs == choice.logprobs, (case, text, stops)
        assert choice.finish == whole.finish
    ids = tok(" the fox lives in the forest .", add_special_tokens=False)["input_ids"]
    stream = ChoiceStream(tok, ["zzz"])
    early = [p.text for t in ids for p in stream.feed([t])]
    assert "".join(early) == "the fox lives in the forest"  # all but the last token, sent before the end


def _run_schedule(max_wait_s: float, plan: list[tuple[float, str, float]], fail: set[str] = frozenset()):
    """Requests (arrival s, key, generation s) through a WeightScheduler whose swaps take 20 ms;
    returns per request (start, end) and the swap log (time, key)."""
    from rayalign.serve.scheduler import WeightScheduler

    async def main():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        swaps: list[tuple[float, str, int]] = []

        async def swap(key: str) -> None:
            swaps.append((loop.time() - t0, key, sched.running))
            await asyncio.sleep(0.02)
            if key in fail:
                raise RuntimeError(f"cannot load {key}")

        sched = WeightScheduler(swap, loaded="a", max_wait_s=max_wait_s)

        async def one(at: float, key: str, gen: float):
            await asyncio.sleep(at)
            try:
                async with sched.hold(key):
                    assert sched.loaded == key
                    start = loop.time() - t0
                    await asyncio.sleep(gen)
                    return start, loop.time() - t0
            except RuntimeError as exc:
                return str(exc)

        out = await asyncio.gather(*(one(*p) for p in plan))
        return out, swaps, sched
    return asyncio.run(main())


def test_requests_for_the_loaded_weights_batch_and_another_key_waits_a_bounded_time():
    # eight requests for the loaded key, then a steady stream of them; one request for key b at 0.05 s
    plan = [(0.0, "a", 0.3)] * 8 + [(0.05, "b", 0.1)] + [(0.1 + 0.05 * i, "a", 0.3) for i in range(20)]
    out, swaps, sched = _run_schedule(0.2, plan)
    starts = [s for s, _ in out[:8]]
    assert max(starts) < 0.05  # the first eight ran together on the loaded weights, no swap
    assert swaps[0][1] == "b" and swaps[0][2] == 0  # swapped only once nothing ran on a
    b_start = out[8][0]
    # b waited at most max_wait_s (0.2) + one drain (0.3) + the swap; not behind the whole stream of a
    assert 0.05 + 0.2 <= b_start <= 0.05 + 0.2 + 0.3 + 0.1, out[8]
    late_a = [s for s, _ in out[9:] if s > b_start]
    assert late_a and min(late_a) >= out[8][1]  # a's later requests came back after b's batch, with a swap back
    assert [k for _, k, _ in swaps] == ["b", "a"] and sched.swaps == 2 and sched.running == 0


def test_an_idle_engine_swaps_at_once_and_a_failed_swap_fails_only_its_key():
    out, swaps, sched = _run_schedule(5.0, [(0.0, "b", 0.05), (0.01, "b", 0.05)])
    assert swaps[0][0] < 0.01 and len(swaps) == 1  # nothing ran on a: no waiting for max_wait_s
    out, swaps, _sched = _run_schedule(0.0, [(0.0, "bad", 0.05), (0.1, "a", 0.05)], fail={"bad"})
    assert out[0] == "cannot load bad" and isinstance(out[1], tuple)
    assert [k for _, k, _ in swaps] == ["bad", "a"]  # after a failed swap the weights are reloaded


def test_which_families_serve_as_combined_adapters(tokenizer_and_preset, tmp_path):
    """LoRA ingredients on one base are served as one combined adapter per preference (vLLM
    max_lora_rank covering the sum of ranks); anything else as full weights, or an error naming
    the family when `weights: adapter` was asked for."""
    from rayalign.config.schema import LoraConfig, ServeConfig
    from rayalign.models.lora import init_adapter
    from rayalign.serve.batching import plan

    store = tmp_path
    base = store / "base"
    shutil.copytree(tokenizer_and_preset[1], base)
    for name, r in (("ad-0", 4), ("ad-1", 8), ("ad-2", 16)):
        init_adapter(base, store / name, LoraConfig(r=r))
    other = store / "other-base"
    shutil.copytree(base, other)
    init_adapter(other, store / "ad-other", LoraConfig(r=4))

    def resolve(*families):
        cfg = ServeConfig.model_validate({"model_store": str(store), "families": list(families)})
        return plan(cfg, {f.name: Family(f, cfg.model_store, cfg.preference_grid) for f in cfg.families})

    lin = {"name": "lin", "models": ["ad-0", "ad-1"], "objectives": ["a", "b"]}
    bone = {"name": "bone", "kind": "bone_soup", "beta": 0.7, "k": 1.2, "base_model": base.name,
            "models": ["ad-1", "ad-2"], "objectives": ["a", "b"]}
    full = {"name": "full", "models": [base.name, "ad-0"], "objectives": ["a", "b"]}
    p = resolve(lin, bone, full)
    assert p.kinds == {"lin": "adapter", "bone": "adapter", "full": "full"} and p.base == base.resolve()
    assert p.ranks == {"lin": 12, "bone": 24} and p.lora_rank == 32  # the smallest vLLM rank >= 24
    assert resolve({**lin, "weights": "full"}).kinds == {"lin": "full"}
    assert resolve({**lin, "allow_negative": True}).kinds == {"lin": "full"}  # weights need not sum to one
    for fam, match in [({**full, "weights": "adapter"}, r"family full: weights: adapter, but its models \[.*\] are "
                        "full checkpoints"),
                       ({**lin, "models": ["ad-0", "ad-other"], "weights": "adapter"}, "on different bases"),
                       ({**lin, "allow_negative": True, "weights": "adapter"}, "allow_negative")]:
        with pytest.raises(ValueError, match=match):
            resolve(fam)
    with pytest.raises(ValueError, match="adapter families on different bases"):
        resolve(lin, {**lin, "name": "lin2", "models": ["ad-other", "ad-other"]})
