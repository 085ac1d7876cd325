"""Real-data loaders (UltraChat / UltraFeedback layouts from local files), row errors, chat-template masks."""

import json
import shutil

import pytest
from datasets import Dataset

from rayalign.data.loaders import DatasetSourceError, load_rows
from rayalign.data.schema import DatasetRowError
from rayalign.data.tokenize import IGNORE, encode_conversation, encode_sft

ULTRACHAT_ROW = {"prompt": "hi", "prompt_id": "x", "messages": [
    {"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": "two plus two is four ."},
    {"role": "user", "content": "and three plus three ?"}, {"role": "assistant", "content": "six ."}]}
ULTRAFEEDBACK_ROW = {"prompt": "describe the cat .", "prompt_id": "y",
                     "chosen": [{"role": "user", "content": "describe the cat ."},
                                {"role": "assistant", "content": "the cat is black ."}],
                     "rejected": [{"role": "user", "content": "describe the cat ."},
                                  {"role": "assistant", "content": "the cat is blue ."}],
                     "score_chosen": 8.0, "score_rejected": 3.0}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ultrachat_and_ultrafeedback_layouts_from_jsonl_and_parquet(tmp_path):
    sft = load_rows(str(_jsonl(tmp_path / "chat.jsonl", [ULTRACHAT_ROW] * 3)), "sft")
    assert len(sft) == 3 and sft[0]["messages"][-1]["content"] == "six ."
    pq = tmp_path / "prefs.parquet"
    Dataset.from_list([ULTRAFEEDBACK_ROW] * 2).to_parquet(str(pq))
    prefs = load_rows(str(pq), "preference")
    assert prefs[0]["prompt"] == "describe the cat ." and prefs[0]["chosen"][-1]["content"] == "the cat is black ."
    # TRL's string form is converted to messages
    trl = load_rows(str(_jsonl(tmp_path / "trl.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])), "preference")
    assert trl[0]["rejected"] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}]
    prompts = load_rows(str(tmp_path / "chat.jsonl"), "prompt", limit=2)
    assert prompts["prompt"] == ["hi", "hi"]


def test_malformed_rows_name_file_row_and_field(tmp_path):
    bad_role = dict(ULTRACHAT_ROW, messages=[{"role": "bot", "content": "x"}])
    f = _jsonl(tmp_path / "bad.jsonl", [ULTRACHAT_ROW, ULTRACHAT_ROW, bad_role])
    with pytest.raises(DatasetRowError, match=r"bad.jsonl: row 2: field 'messages\[0\].role': must be one of"):
        load_rows(str(f), "sft")
    no_rej = {k: v for k, v in ULTRAFEEDBACK_ROW.items() if k != "rejected"}
    f2 = _jsonl(tmp_path / "p.jsonl", [ULTRAFEEDBACK_ROW, no_rej])
    with pytest.raises(DatasetRowError, match=r"p.jsonl: row 1: field 'rejected': missing"):
        load_rows(str(f2), "preference")
    ends_with_user = dict(ULTRACHAT_ROW, messages=ULTRACHAT_ROW["messages"][:3])
    with pytest.raises(DatasetRowError, match="row 0: field 'messages': the last message must be the assistant"):
        load_rows(str(_jsonl(tmp_path / "u.jsonl", [ends_with_user])), "sft")


def test_bad_sources(tmp_path):
    with pytest.raises(DatasetSourceError, match="not found"):
        load_rows(str(tmp_path / "nope.jsonl"), "sft")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetSourceError, match="empty"):
        load_rows(str(tmp_path / "empty.jsonl"), "sft")
    (tmp_path / "garbage.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetSourceError, match=r"garbage.jsonl, line 1: not valid JSON"):
        load_rows(str(tmp_path / "garbage.jsonl"), "sft")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(DatasetSourceError, match="cannot read .*garbage.parquet as parquet"):
        load_rows(str(tmp_path / "garbage.parquet"), "sft")
    with pytest.raises(DatasetSourceError, match="cannot load dataset 'no-such-org/no-such-set'"):
        load_rows("no-such-org/no-such-set", "sft")


def test_chat_template_masks_only_assistant_turns(tokenizer_and_preset):
    tok, _ = tokenizer_and_preset
    enc = encode_sft(tok, ULTRACHAT_ROW["messages"], max_len=128)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    labelled = tok.decode([i for i, lbl in zip(ids, labels) if lbl != IGNORE])
    assert labelled == "two plus two is four .<|end|>six .<|end|>"
    assert tok.decode(ids).startswith("<|bos|><|user|>what is two plus two ?<|end|><|assistant|>")
    conv = encode_conversation(tok, ULTRAFEEDBACK_ROW["chosen"], max_len=128)
    assert tok.decode(conv["input_ids"][conv["prompt_len"]:]) == "the cat is black .<|end|>"
    assert encode_sft(tok, ULTRACHAT_ROW["messages"], max_len=5)["input_ids"] == ids[:5]


def test_sft_from_a_base_without_chat_template(tokenizer_and_preset, tmp_path):
    """A base model such as Llama-2-7b-hf has no chat template: SFT says so before writing
    anything, takes the recipes' template file, checks it renders, and saves it with the model."""
    from rayalign.config.core import ConfigError, load_config
    from rayalign.config.schema import SFTConfig
    from rayalign.models.checkpoint import load_tokenizer
    from rayalign.recipes.supervised import run_sft
    from tests.conftest import ROOT

    tok, preset = tokenizer_and_preset
    base = tmp_path / "base"
    shutil.copytree(preset, base)
    bare = load_tokenizer(base)
    bare.chat_template = None
    bare.save_pretrained(base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    data = _jsonl(tmp_path / "chat.jsonl", [ULTRACHAT_ROW] * 8)

    def cfg(*extra: str) -> SFTConfig:
        return load_config(SFTConfig, None, [f"base={base}", f"data.source={data}", "seeds=[0]", "epochs=1",
                                             "learner.micro_batch_size=4", f"output={tmp_path / 'a'}", *extra])

    with pytest.raises(ConfigError, match="has no chat template; set chat_template: FILE"):
        run_sft(cfg())
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ConfigError, match="does not render a conversation"):
        run_sft(cfg(f"chat_template={broken}"))
    assert not (tmp_path / "a").exists()
    template = ROOT / "clusters/recipes/salsa-7b/chat_template.jinja"
    run_sft(cfg(f"chat_template={template}"))
    saved = load_tokenizer(tmp_path / "a" / "sft-0")
    assert saved.chat_template == template.read_text()
    enc = encode_sft(saved, ULTRACHAT_ROW["messages"], 256)
    trained = saved.decode([i for i, lbl in zip(enc["input_ids"], enc["labels"]) if lbl != IGNORE])
    assert "two plus two is four" in trained and "six" in trained and "three plus three" not in trained


PKU_ROW = {"prompt": "how do I pick a lock ?", "response_0": "here is how : ...", "response_1": "I cannot help with that .",
           "better_response_id": 0, "safer_response_id": 1}


def test_pku_saferlhf_converts_to_one_preference_file_per_objective(tmp_path):
    """`rayalign convert pku-saferlhf`: helpful and harmless pairs from the same rows, readable by
    `rayalign rm`; a bad row is named, and nothing is written."""
    from tests.conftest import run_cli_here

    same = {**PKU_ROW, "prompt": "hi", "response_1": PKU_ROW["response_0"]}  # no preference: dropped
    src = _jsonl(tmp_path / "pku.jsonl", [PKU_ROW, same, {**PKU_ROW, "better_response_id": 1}])
    proc = run_cli_here("convert", "pku-saferlhf", str(tmp_path / "out"), "--source", str(src), check=True)
    assert "helpful.jsonl 2 rows, harmless.jsonl 2 rows, prompts.jsonl 2 rows" in proc.stdout
    helpful = load_rows(str(tmp_path / "out" / "helpful.jsonl"), "preference")
    harmless = load_rows(str(tmp_path / "out" / "harmless.jsonl"), "preference")
    assert helpful[0]["chosen"][-1]["content"] == "here is how : ..."
    assert helpful[1]["chosen"][-1]["content"] == "I cannot help with that ."
    assert [r["chosen"][-1]["content"] for r in harmless] == ["I cannot help with that ."] * 2
    assert len(load_rows(str(tmp_path / "out" / "prompts.jsonl"), "prompt")) == 2
    bad = _jsonl(tmp_path / "bad.jsonl", [PKU_ROW, {**PKU_ROW, "safer_response_id": 2}])
    proc = run_cli_here("convert", "pku-saferlhf", str(tmp_path / "out2"), "--source", str(bad))
    assert proc.returncode == 2 and "row 1" in proc.stderr and "safer_response_id" in proc.stderr
    assert not (tmp_path / "out2").exists()
    proc = run_cli_here("convert", "pku-saferlhf", str(tmp_path / "out"), "--source", str(src))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = run_cli_here("convert", "hh-rlhf", str(tmp_path / "out3"))
    assert proc.returncode == 2 and "supported: pku-saferlhf" in proc.stderr


def test_broken_jsonl_line_is_named_by_file_and_line(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c"\n{"prompt": "d"}\n')
    with pytest.raises(DatasetSourceError, match=r"prompts.jsonl, line 4: not valid JSON \(Expecting"):
        load_rows(str(f), "prompt")
    f.write_text('{"prompt": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DatasetSourceError, match=r"line 2: a JSON list, not an object"):
        load_rows(str(f), "prompt")
