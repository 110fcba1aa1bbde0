"""The data contract: schema, manifest, row checks, and the top-k alignment rule."""

import json

import pytest
import torch

from dadpo_ray.config import ModelSpec
from dadpo_ray.errors import DadpoError
from dadpo_ray.models import load_model, load_tokenizer, vocab_fingerprint
from dadpo_ray.records import (
    Manifest, ModelRecord, list_shards, open_dataset, read_manifest, read_rows, row_problems, write_manifest,
    write_shard,
)
from dadpo_ray.scoring import score_responses


def make_row(i, k=3, n=4):
    return {
        "id": f"r{i}", "split": "train", "prompt_messages": [{"role": "user", "content": "hi"}],
        "prompt_ids": [1, 2, 3], "chosen_ids": list(range(n)), "chosen_text": "abcd", "chosen_finish": "stop",
        "rejected_ids": [5, 6], "rejected_text": "ef", "rejected_finish": "length",
        "teacher_chosen_logp": -1.0, "teacher_rejected_logp": -9.0, "ref_chosen_logp": -5.0,
        "ref_rejected_logp": -2.0, "chosen_topk_ids": [[0, 1, 2]] * n, "chosen_topk_logprobs": [[-.1, -2., -3.]] * n,
        "rejected_topk_ids": None, "rejected_topk_logprobs": None,
    }


def make_manifest(files, **kw):
    fields = dict(config_fingerprint="abc", teacher=ModelRecord(path="t"), student=ModelRecord(path="s"),
                  reference=ModelRecord(path="s"), vocab_size=259, vocab_hash="h" * 64, topk=3,
                  topk_for_rejected=False, generation={}, rows={"train": 2}, rejected_rows=0,
                  rejected_reasons={}, files=files)
    fields.update(kw)
    return Manifest(**fields)


def test_roundtrip_and_validation(tmp_path):
    out = str(tmp_path / "data")
    write_shard(out, "part-00000.parquet", [make_row(0), make_row(1)])
    write_manifest(out, make_manifest(["part-00000.parquet"]))
    assert list_shards(out) == ["part-00000.parquet"]
    manifest = open_dataset(out, 259, "h" * 64)
    rows = read_rows(out, manifest.files).to_pylist()
    assert [r["id"] for r in rows] == ["r0", "r1"] and rows[0]["chosen_topk_ids"][0] == [0, 1, 2]
    assert not list(tmp_path.glob("data/*.tmp-*"))  # temp files renamed away
    with pytest.raises(DadpoError, match=r"dataset tokenizer \(259 tokens.*differs from the student's \(300 tokens"):
        open_dataset(out, 300, "x" * 64)


def test_row_problems_name_what_is_wrong():
    assert row_problems(make_row(0), k=3) == []
    bad = make_row(0)
    bad["chosen_topk_ids"] = bad["chosen_topk_ids"][:-1]
    assert row_problems(bad, 3) == ["chosen top-k has 3 rows for 4 response tokens"]
    bad = make_row(0)
    bad["ref_rejected_logp"] = float("nan")
    assert row_problems(bad, 3) == ["ref_rejected_logp is nan"]
    assert row_problems(make_row(0), k=4) == ["chosen top-k rows are not all of length k=4"]


def test_manifest_refusals(tmp_path):
    with pytest.raises(DadpoError, match="no manifest.json"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(DadpoError, match="manifest.json: not valid JSON"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(DadpoError, match="schema_version 99"):
        read_manifest(str(tmp_path))
    write_manifest(str(tmp_path), make_manifest(["part-00007.parquet"]))
    with pytest.raises(DadpoError, match="shards that are missing"):
        open_dataset(str(tmp_path))


def test_topk_alignment_matches_raw_generation_logits():
    """Top-k row j = the teacher's raw (temperature-1) distribution when it predicted response token j.

    generate(output_logits=True) returns the raw logits of each step (output_scores would be processed by
    temperature / top-p). A second, batched and left-padded forward over prompt + response must reproduce them.
    """
    spec = ModelSpec(path="tiny-teacher")
    tok, model = load_tokenizer(spec), load_model(spec)
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                       return_dict=False) for c in ("hello there", "a much longer prompt, to force left padding in the batch")]
    torch.manual_seed(0)
    responses, step_logits = [], []
    for p in prompts:  # one at a time: no padding in the reference run
        out = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9,
                             output_logits=True, return_dict_in_generate=True)
        responses.append(out.sequences[0, len(p):].tolist())
        step_logits.append(torch.stack(out.logits, dim=1)[0])  # [T, V]
    scored = score_responses(model, prompts, responses, k=5, pad_id=tok.pad_token_id)
    for s, response, raw in zip(scored, responses, step_logits):
        logprobs = torch.log_softmax(raw.float(), -1)
        top = logprobs.topk(5, -1)
        assert s.topk_ids == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(s.topk_logprobs), top.values, atol=1e-4, rtol=0)
        expected = logprobs.gather(-1, torch.tensor(response)[:, None]).sum().item()
        assert s.logp == pytest.approx(expected, abs=1e-3)
    assert vocab_fingerprint(tok).size == 259
