"""Structured width pruning (dadpo_ray/prune.py) on tiny seeded Llama / Qwen2 models; no downloads, a few seconds.

The models: hidden 64, 2 layers, MLP 128, 4 query heads over 2 KV heads (head_dim 16, n_rep 2), vocab 300.
"""

import copy
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM

from dadpo_ray.models import build_tiny_tokenizer
from dadpo_ray.prune import (
    PruneError,
    kept_count,
    kv_group_scores,
    mlp_channel_scores,
    prune_kv_groups,
    prune_mlp_channels,
    prune_model,
    save_pruned,
)

HIDDEN, MLP, LAYERS, HEADS, KV, VOCAB = 64, 128, 2, 4, 2, 300
HEAD_DIM, N_REP = HIDDEN // HEADS, HEADS // KV


def tiny(arch="llama", seed=0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **kw)).eval()
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **kw)).eval()  # q/k/v carry biases


def token_prompts(n=8, length=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g) for _ in range(n)]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits


def mean_loss(model, prompts):
    with torch.no_grad():
        return sum(model(input_ids=p[None], labels=p[None]).loss.item() for p in prompts) / len(prompts)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine torch's spinning worker threads
    make them ~10x slower; one thread keeps this file at a few seconds either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    """A tiny Llama that has memorised 8 random 32-token sequences (loss ~0.08): its units now matter unequally."""
    model, prompts = tiny(seed=0), token_prompts()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.stack(prompts)  # [8, 32]
    model.train()
    for _ in range(60):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), prompts


# ------------------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize(
    "n, ratio, multiple, kept",
    [
        (1536, 0.2, 8, 1232),  # SmolLM2: 1228.8 -> 1232
        (1536, 0.3, 8, 1072),  # 1075.2 -> 1072
        (128, 0.01, 8, 128),  # 126.7 rounds back up to everything: nothing removed
        (12, 0.9, 8, 1),  # under 8 kept: plain rounding, not up to 8
        (4, 0.99, 8, 1),  # never zero
        (3, 0.2, 1, 2),  # SmolLM2's 3 KV heads at 20%: 2.4 -> 2
    ],
)
def test_kept_count(n, ratio, multiple, kept):
    assert kept_count(n, ratio, multiple) == kept


# ------------------------------------------------------------------------------------------------ surgery
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pruned_equals_original_with_removed_units_zeroed(arch):
    """Invariant: cutting units out == zeroing their output weights in the unpruned model. A removed MLP channel
    only reaches the residual through its down_proj column, a removed query head only through its o_proj columns
    (q/k/v biases included, Qwen2). So this checks every row/column index of the surgery."""
    model, ids = tiny(arch), token_prompts(1)[0]
    g = torch.Generator().manual_seed(3)
    keep_mlp = [torch.randperm(MLP, generator=g)[:40].sort().values for _ in range(LAYERS)]
    keep_kv = [torch.tensor([1]), torch.tensor([0])]  # a different group in each layer

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer, ch, kv in zip(reference.model.layers, keep_mlp, keep_kv):
            gone = torch.ones(MLP, dtype=torch.bool)
            gone[ch] = False
            layer.mlp.down_proj.weight[:, gone] = 0
            heads_gone = torch.tensor([h // N_REP not in kv.tolist() for h in range(HEADS)]).repeat_interleave(HEAD_DIM)
            layer.self_attn.o_proj.weight[:, heads_gone] = 0

    prune_mlp_channels(model, keep_mlp)
    prune_kv_groups(model, keep_kv)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (40, HIDDEN)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (N_REP * HEAD_DIM, HIDDEN)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_and_reload_gives_identical_logits(arch, tmp_path):
    model, tokenizer = tiny(arch), build_tiny_tokenizer()
    model, report = prune_model(model, 0.5, calibration=["Hello there, how are you?", "Pruning keeps what matters."],
                                tokenizer=tokenizer, prune_heads=True)
    out = save_pruned(model, tokenizer, tmp_path / "student")

    assert (out / "model.safetensors").exists() and (out / "generation_config.json").exists()
    assert (out / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temp dir left beside it
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = loaded.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 2, 1, 16)
    assert report["mlp_channels_per_layer"] == {"before": MLP, "kept": 64}
    assert report["kv_heads_per_layer"] == {"before": KV, "kept": 1}
    assert report["attention_heads_per_layer"] == {"before": HEADS, "kept": 2}
    ids = torch.tensor(tokenizer("A prompt the model never saw.").input_ids)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    if arch == "qwen2":
        assert loaded.model.layers[0].self_attn.q_proj.bias.shape == (2 * HEAD_DIM,)


def test_param_count_drops_by_the_hand_counted_amount():
    """Llama, no biases. Per layer: MLP 128 -> 64 channels removes 64 * 3 * hidden; 1 of 2 KV groups removes its
    2 query heads (q rows + o columns: 2 * 2 * 16 * 64) and its KV head (k + v rows: 2 * 16 * 64)."""
    model = tiny()
    _, report = prune_model(model, 0.5, score="magnitude", prune_heads=True)
    per_layer = 64 * 3 * HIDDEN + 2 * 2 * HEAD_DIM * HIDDEN + 2 * HEAD_DIM * HIDDEN  # 12288 + 4096 + 2048
    assert report["params_before"] - report["params_after"] == LAYERS * per_layer
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    assert report["effective_ratio"] == {"mlp": 0.5, "kv_groups": 0.5}


def test_ratio_that_removes_nothing_changes_nothing():
    model, ids = tiny(), token_prompts(1)[0]
    before = logits(model, ids)
    _, report = prune_model(model, 0.01, calibration=token_prompts(2), prune_heads=True)  # 126.7 -> 128, 1.98 -> 2
    assert report["params_after"] == report["params_before"]
    assert torch.equal(logits(model, ids), before)


def test_tied_embeddings_stay_tied(tmp_path):
    model = tiny()
    prune_model(model, 0.25, score="magnitude")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loaded = AutoModelForCausalLM.from_pretrained(save_pruned(model, None, tmp_path / "m"))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_taylor_leaves_no_gradients_and_keeps_requires_grad():
    model = tiny()
    model.model.embed_tokens.weight.requires_grad_(False)  # a caller's freezing survives
    prune_model(model, 0.25, calibration=token_prompts(2), prune_heads=True)
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.model.layers[0].mlp.gate_proj.weight.requires_grad


# ------------------------------------------------------------------------------------------------ scores
def test_magnitude_scores_by_hand():
    """All weights zero, then a few blocks set; a unit's magnitude score is the sum of its squared weights.

    MLP: gate row 3 = 1, up row 3 = 1, down column 3 = 2 -> channel 3: 64 + 64 + 64 * 4 = 384;
         down column 5 = 1 -> channel 5: 64; all others 0.
    Attention (query heads 0, 1 read KV head 0; heads 2, 3 read KV head 1):
         k rows of KV head 0 = 2 -> 16 * 64 * 4 = 4096 to group 0;  o columns of query head 1 = 1 -> 16 * 64 = 1024
         to group 0;  q rows of query head 3 = 3 -> 16 * 64 * 9 = 9216 to group 1.  Groups: [5120, 9216]."""
    layer = tiny().model.layers[0]
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        layer.mlp.gate_proj.weight[3] = 1
        layer.mlp.up_proj.weight[3] = 1
        layer.mlp.down_proj.weight[:, 3] = 2
        layer.mlp.down_proj.weight[:, 5] = 1
        layer.self_attn.k_proj.weight[0:HEAD_DIM] = 2
        layer.self_attn.o_proj.weight[:, 1 * HEAD_DIM:2 * HEAD_DIM] = 1
        layer.self_attn.q_proj.weight[3 * HEAD_DIM:4 * HEAD_DIM] = 3
    expected_mlp = torch.zeros(MLP)
    expected_mlp[3], expected_mlp[5] = 384, 64
    assert torch.equal(mlp_channel_scores(layer, "magnitude"), expected_mlp)
    assert torch.equal(kv_group_scores(layer, "magnitude", HEAD_DIM), torch.tensor([5120.0, 9216.0]))


@pytest.mark.parametrize("score", ["taylor", "magnitude"])
def test_planted_important_units_survive(score):
    """Scale up MLP channel 77 and KV group 1 of layer 1 (x10) in a random model; removing 75% of channels and
    half of the groups must keep both."""
    model = tiny()
    mlp, attn = model.model.layers[1].mlp, model.model.layers[1].self_attn
    group_rows = slice(1 * HEAD_DIM, 2 * HEAD_DIM)  # KV head 1 in k/v; its query heads 2, 3 in q/o:
    q_rows = slice(1 * N_REP * HEAD_DIM, 2 * N_REP * HEAD_DIM)
    with torch.no_grad():
        for w in (mlp.gate_proj.weight[77], mlp.up_proj.weight[77], mlp.down_proj.weight[:, 77]):
            w.mul_(10)
        for w in (attn.v_proj.weight[group_rows], attn.o_proj.weight[:, q_rows]):
            w.mul_(10)
    planted_row = mlp.gate_proj.weight[77].clone()
    planted_v = attn.v_proj.weight[group_rows].clone()

    prune_model(model, 0.75, score=score, calibration=token_prompts(4), prune_heads=True)
    mlp, attn = model.model.layers[1].mlp, model.model.layers[1].self_attn
    assert mlp.gate_proj.weight.shape[0] == 32
    assert any(torch.equal(row, planted_row) for row in mlp.gate_proj.weight)
    assert torch.equal(attn.v_proj.weight, planted_v)  # the one kept group is group 1


def test_taylor_beats_random_channels(trained):
    """Removing half of each MLP from a model that memorised its calibration text: the Taylor choice loses less
    than random choices (observed: 0.63 against 0.71-0.83 for random, base 0.07)."""
    model, prompts = trained
    taylor, _ = prune_model(copy.deepcopy(model), 0.5, calibration=prompts)
    random_losses = []
    for seed in range(4):
        g = torch.Generator().manual_seed(100 + seed)
        pruned = copy.deepcopy(model)
        prune_mlp_channels(pruned, [torch.randperm(MLP, generator=g)[:64].sort().values for _ in range(LAYERS)])
        random_losses.append(mean_loss(pruned, prompts))
    taylor_loss = mean_loss(taylor, prompts)
    assert taylor_loss < sum(random_losses) / len(random_losses), (taylor_loss, random_losses)
    assert mean_loss(model, prompts) < taylor_loss  # pruning costs something: the losses are real


def test_text_calibration_equals_its_token_ids():
    tokenizer = build_tiny_tokenizer()
    texts = ["The quick brown fox jumps over the lazy dog.", "Distil the teacher into the student."]
    by_text, _ = prune_model(tiny(), 0.5, calibration=texts, tokenizer=tokenizer, prune_heads=True)
    by_ids, _ = prune_model(tiny(), 0.5, calibration=[tokenizer(t, return_tensors="pt").input_ids for t in texts],
                            prune_heads=True)
    ids = token_prompts(1)[0]
    assert torch.equal(logits(by_text, ids), logits(by_ids, ids))


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("ratio", [0, 1, 1.0, -0.2, 1.5, math.nan, True, "0.2"])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match=r"ratio .* got " + repr(ratio).replace(".", r"\.")):
        prune_model(tiny(), ratio, score="magnitude")


def test_unsupported_architecture_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="'gpt2'"):
        prune_model(gpt2, 0.2, score="magnitude")


def test_missing_calibration_and_unknown_score_are_refused():
    with pytest.raises(PruneError, match="calibration"):
        prune_model(tiny(), 0.2)
    with pytest.raises(PruneError, match="tokenizer"):
        prune_model(tiny(), 0.2, calibration=["text without a tokenizer"])
    with pytest.raises(PruneError, match="'wanda'"):
        prune_model(tiny(), 0.2, score="wanda")


# ------------------------------------------------------------------------------------------------ saving
def test_save_refuses_non_empty_dir_unless_overwrite(tmp_path):
    model = tiny()
    out = tmp_path / "student"
    out.mkdir()
    save_pruned(model, None, out)  # an empty dir is fine
    with pytest.raises(PruneError, match="overwrite=True"):
        save_pruned(model, None, out)
    (out / "stale.txt").write_text("from an older run")
    save_pruned(model, None, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_crash_while_saving_leaves_no_half_written_dir(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    model = tiny()
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, BrokenTokenizer(), tmp_path / "student")
    assert list(tmp_path.iterdir()) == []


def test_crash_while_replacing_puts_the_previous_dir_back(tmp_path, monkeypatch):
    """overwrite=True moves the old dir aside before renaming the new one in; if that last rename fails, the old
    dir returns to its place and nothing else is left behind."""
    model = tiny()
    previous = save_pruned(model, None, tmp_path / "student")
    (previous / "marker.txt").write_text("previous run")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".student.tmp-"):
            raise OSError("crash mid-rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="crash mid-rename"):
        save_pruned(model, None, previous, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["student"]
    assert (previous / "marker.txt").read_text() == "previous run"
