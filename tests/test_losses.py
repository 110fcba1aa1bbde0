"""Unit tests for dadpo_ray/losses.py: hand-derived cases, peer fixtures, invariants, gradchecks.

Run: .venv/bin/python -m pytest -q tests/test_losses.py
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dadpo_ray.losses import (PRESETS, LossWeights, combined_loss, dadpo_loss, dadpo_margin, dpo_loss,
                              sft_nll, sparse_topk_kl, token_logps_chunked, token_logps_naive,
                              topk_kl_from_logps)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fixtures"
D = torch.float64


def load_fixture(name):
    path = FIXTURES / name
    if not path.is_file():
        pytest.fail(f"fixture {path} is missing: the shared fixtures folder {FIXTURES} must sit next to "
                    f"the repo (../shared/data/fixtures)")
    return json.loads(path.read_text())


def t(x):
    return torch.tensor(x, dtype=D)


# -----------------------------------------------------------------------------
# DPO / daDPO


def test_dpo_hand_derived():
    """lp_c=-1, lp_r=-3, ref_c=ref_r=-2, beta=0.5:
    h = (lp_c - ref_c) - (lp_r - ref_r) = 1 - (-1) = 2, m = beta h = 1, loss = -log sigmoid(1) = log(1 + e^-1)
    = 0.3132616875. With eps = 0.1: -(1-eps) log s(m) - eps log s(-m) = softplus(-m) + eps m
    (since softplus(m) = m + softplus(-m)) = 0.3132616875 + 0.1 = 0.4132616875.
    """
    args = (t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))
    assert dpo_loss(*args, beta=0.5).item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-12)
    assert dpo_loss(*args, beta=0.5).item() == pytest.approx(0.3132616875182229, abs=1e-12)
    assert dpo_loss(*args, beta=0.5, label_smoothing=0.1).item() == pytest.approx(0.4132616875182229, abs=1e-12)


def test_dadpo_hand_derived():
    """b1=0.1, b2=0.05; lp_c=-10, lp_r=-20, ref_c=-12, ref_r=-16, tch_c=-4, tch_r=-30.
    Reference term: (lp_c - ref_c) - (lp_r - ref_r) = 2 - (-4) = 6        -> b1 * 6   = 0.6
    Teacher term:   (lp_c - tch_c) - (lp_r - tch_r) = -6 - 10 = -16        -> b2 * -16 = -0.8
    m = -0.2, loss = -log sigmoid(-0.2) = log(1 + e^0.2) = 0.7981388694.
    Rewards: chosen = b1 (lp_c - ref_c) = 0.2, rejected = b1 (lp_r - ref_r) = -0.4 (so reward_acc = 1).
    """
    args = [t([v]) for v in (-10.0, -20.0, -12.0, -16.0, -4.0, -30.0)]
    loss = dadpo_loss(*args, beta1=0.1, beta2=0.05)
    assert loss.item() == pytest.approx(0.7981388693815918, abs=1e-12)
    margin, chosen_r, rejected_r = dadpo_margin(*args, beta1=0.1, beta2=0.05)
    assert margin.item() == pytest.approx(-0.2, abs=1e-12)
    assert chosen_r.item() == pytest.approx(0.2, abs=1e-12)
    assert rejected_r.item() == pytest.approx(-0.4, abs=1e-12)


def _random_pairs(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-50 - 100 * torch.rand(n, generator=g, dtype=D) for _ in range(6)]  # lp_c, lp_r, ref_c, ref_r, tch_c, tch_r


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dadpo_beta2_zero_is_dpo_exactly(label_smoothing):
    lp_c, lp_r, ref_c, ref_r, tch_c, tch_r = _random_pairs()
    dpo = dpo_loss(lp_c, lp_r, ref_c, ref_r, 0.3, label_smoothing)
    dadpo = dadpo_loss(lp_c, lp_r, ref_c, ref_r, tch_c, tch_r, 0.3, 0.0, label_smoothing)
    assert torch.equal(dpo, dadpo)


def test_dadpo_is_dpo_against_geometric_mixture_reference():
    """m = (b1+b2)(lp_c - lp_r) - b1(ref_c - ref_r) - b2(tch_c - tch_r): DPO with beta = b1+b2 and the
    reference log-prob (b1 ref + b2 tch) / (b1 + b2)."""
    lp_c, lp_r, ref_c, ref_r, tch_c, tch_r = _random_pairs(seed=1)
    b1, b2 = 0.1, 0.05
    mix_c, mix_r = (b1 * ref_c + b2 * tch_c) / (b1 + b2), (b1 * ref_r + b2 * tch_r) / (b1 + b2)
    torch.testing.assert_close(dadpo_loss(lp_c, lp_r, ref_c, ref_r, tch_c, tch_r, b1, b2, 0.1),
                               dpo_loss(lp_c, lp_r, mix_c, mix_r, b1 + b2, 0.1))


def test_label_smoothing_behaviour():
    """loss(eps) = softplus(-m) + eps m: linear in eps, so for m > 0 smoothing raises the loss; at eps = 1/2
    it is (softplus(m) + softplus(-m)) / 2, even in m (labels carry no information); for 0 < eps < 1/2 the
    loss is minimised at the finite margin m* = log((1 - eps) / eps) instead of m -> infinity."""
    m = torch.linspace(-3, 3, 13, dtype=D)
    zeros = torch.zeros_like(m)
    for eps in (0.0, 0.1, 0.25):
        torch.testing.assert_close(dpo_loss(m, zeros, zeros, zeros, 1.0, eps), F.softplus(-m) + eps * m)
    pos = m > 0
    assert (dpo_loss(m, zeros, zeros, zeros, 1.0, 0.1)[pos] > dpo_loss(m, zeros, zeros, zeros, 1.0)[pos]).all()
    half = dpo_loss(m, zeros, zeros, zeros, 1.0, 0.5)
    torch.testing.assert_close(half, half.flip(0))
    # d/dm [softplus(-m) + eps m] = -sigmoid(-m) + eps = 0  at  m* = log((1 - eps) / eps)
    m_star = t([math.log(0.9 / 0.1)]).requires_grad_()
    dpo_loss(m_star, t([0.0]), t([0.0]), t([0.0]), 1.0, 0.1).sum().backward()
    assert abs(m_star.grad.item()) < 1e-12


def test_dpo_against_trl_fixture():
    """Per-example losses and rewards of TRL 0.28 DPOTrainer.dpo_loss (sigmoid cases; ipo/hinge not ours)."""
    d = load_fixture("dpo_loss_reference.json")
    lp_c, lp_r, ref_c, ref_r = (t(d[k]) for k in ("policy_chosen_logps", "policy_rejected_logps",
                                                  "reference_chosen_logps", "reference_rejected_logps"))
    assert {c["loss_type"] for c in d["cases"]} == {"sigmoid", "ipo", "hinge"}
    sigmoid = [c for c in d["cases"] if c["loss_type"] == "sigmoid"]
    assert {(c["beta"], c["label_smoothing"]) for c in sigmoid} == {(0.1, 0.0), (0.5, 0.1)}
    for case in d["cases"]:
        assert {"beta", "label_smoothing", "per_example_loss", "mean_loss", "chosen_rewards",
                "rejected_rewards"} <= case.keys()
    for case in sigmoid:
        beta, eps, expected = case["beta"], case["label_smoothing"], t(case["per_example_loss"])
        dpo = dpo_loss(lp_c, lp_r, ref_c, ref_r, beta, eps)
        torch.testing.assert_close(dpo, expected, rtol=1e-12, atol=1e-10)
        assert dpo.mean().item() == pytest.approx(case["mean_loss"], rel=1e-12)
        zeros = torch.zeros_like(lp_c)
        torch.testing.assert_close(dadpo_loss(lp_c, lp_r, ref_c, ref_r, zeros, zeros, beta, 0.0, eps),
                                   expected, rtol=1e-12, atol=1e-10)
        _, chosen_r, rejected_r = dadpo_margin(lp_c, lp_r, ref_c, ref_r, None, None, beta, 0.0)
        torch.testing.assert_close(chosen_r, t(case["chosen_rewards"]))
        torch.testing.assert_close(rejected_r, t(case["rejected_rewards"]))


def test_dadpo_gradcheck():
    lp_c, lp_r, ref_c, ref_r, tch_c, tch_r = (x[:4] / 50 for x in _random_pairs(seed=2))
    lp_c.requires_grad_(), lp_r.requires_grad_()
    f = lambda a, b: dadpo_loss(a, b, ref_c, ref_r, tch_c, tch_r, 0.3, 0.2, label_smoothing=0.1)
    assert torch.autograd.gradcheck(f, (lp_c, lp_r))


# -----------------------------------------------------------------------------
# Sparse top-k KL


def _hand_case():
    """V = 4: teacher p = [1/2, 1/4, 1/8, 1/8], top-2 ids [0, 1]; student logits 0 so q = 1/4 each."""
    teacher_lp = t([0.5, 0.25, 0.125, 0.125]).log()
    student_logits = torch.zeros(1, 1, 4, dtype=D)
    ids = torch.tensor([[[0, 1]]])
    return student_logits, ids, teacher_lp[ids], torch.ones(1, 1, dtype=torch.bool)


def test_topk_kl_hand_derived_tail():
    """Buckets p = [1/2, 1/4, tail 1/4], q = [1/4, 1/4, tail 1/2]:
    KL = 1/2 ln 2 + 1/4 ln 1 + 1/4 ln(1/2) = 1/4 ln 2 = 0.1732867951.
    The dense KL is the same: 1/2 ln 2 + 0 + 2 * 1/8 ln(1/2) = 1/4 ln 2, because p/q = 1/2 on both tail
    tokens (the tail bucket is exact when p/q is constant over the tail)."""
    kl = sparse_topk_kl(*_hand_case())
    assert kl.item() == pytest.approx(0.25 * math.log(2), abs=1e-12)


def test_topk_kl_hand_derived_both_renorm():
    """Renormalised on top-2: p_hat = [2/3, 1/3], q_hat = [1/2, 1/2]:
    KL = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.0566330123."""
    kl = sparse_topk_kl(*_hand_case(), tail=False)
    assert kl.item() == pytest.approx(2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3), abs=1e-12)
    assert kl.item() == pytest.approx(0.056633012265132426, abs=1e-12)


def test_topk_kl_hand_derived_temperature():
    """T = 2, tail=False. Teacher p^(1/2) on top-2: [1/sqrt2, 1/2], renormalised: [2 - sqrt2, sqrt2 - 1].
    Student logits 0 stay uniform: q_hat = [1/2, 1/2]. KL * T^2 =
    4 [(2 - sqrt2) ln(2 (2 - sqrt2)) + (sqrt2 - 1) ln(2 (sqrt2 - 1))] = 0.0591668095."""
    kl = sparse_topk_kl(*_hand_case(), tail=False, temperature=2.0)
    s = math.sqrt(2)
    expected = 4 * ((2 - s) * math.log(2 * (2 - s)) + (s - 1) * math.log(2 * (s - 1)))
    assert kl.item() == pytest.approx(expected, abs=1e-12)
    assert kl.item() == pytest.approx(0.059166809464296755, abs=1e-12)


def _kl_fixture():
    d = load_fixture("sparse_topk_kl_reference.json")
    assert (d["shape"]["B"], d["shape"]["T"], d["shape"]["V"], d["shape"]["K"]) == (2, 5, 32, 4)
    return (t(d["student_logits"]), torch.tensor(d["teacher_topk_ids"]), t(d["teacher_topk_logprobs"]),
            torch.tensor(d["mask"]), t(d["teacher_logits_full"]), d["expected"])


def test_topk_kl_against_fixture():
    student, ids, lp, mask, _, expected = _kl_fixture()
    assert sparse_topk_kl(student, ids, lp, mask).item() == pytest.approx(expected["tail_bucket"], abs=1e-10)
    assert sparse_topk_kl(student, ids, lp, mask, tail=False).item() == pytest.approx(
        expected["both_renorm"], abs=1e-10)
    # fp32 inputs (the training dtype) agree to fp32 precision
    assert sparse_topk_kl(student.float(), ids, lp.float(), mask).item() == pytest.approx(
        expected["tail_bucket"], rel=1e-5)


@pytest.mark.parametrize("tail", [True, False])
def test_topk_kl_full_vocab_is_dense(tail):
    student, _, _, mask, teacher_full, expected = _kl_fixture()
    ids = teacher_full.argsort(-1, descending=True)                # [B,T,V]: top-V = whole vocabulary
    lp = F.log_softmax(teacher_full, -1).gather(-1, ids)          # [B,T,V]
    assert sparse_topk_kl(student, ids, lp, mask, tail=tail).item() == pytest.approx(
        expected["dense_full_vocab"], abs=1e-10)
    assert sparse_topk_kl(student.float(), ids, lp.float(), mask, tail=tail).item() == pytest.approx(
        expected["dense_full_vocab"], rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_topk_kl_temperature_full_vocab_and_renorm_are_exact(temperature):
    """Dense tempered KL: T^2 KL(softmax(z_t/T) || softmax(z_s/T)); K = V matches it in both modes
    (the tail is empty), and tail=False at K < V matches the dense KL of both tempered distributions
    restricted to the top-k and renormalised."""
    student, ids, _, mask, teacher_full, _ = _kl_fixture()
    m = mask.bool()
    lp_t, lq_s = F.log_softmax(teacher_full[m] / temperature, -1), F.log_softmax(student[m] / temperature, -1)
    dense = temperature ** 2 * (lp_t.exp() * (lp_t - lq_s)).sum(-1).mean()
    ids_all = teacher_full.argsort(-1, descending=True)
    lp_all = F.log_softmax(teacher_full, -1).gather(-1, ids_all)
    for tail in (True, False):
        torch.testing.assert_close(sparse_topk_kl(student, ids_all, lp_all, mask, tail, temperature), dense)
    p = F.log_softmax(teacher_full[m].gather(-1, ids[m]) / temperature, -1)   # [N,K]
    q = F.log_softmax(student[m].gather(-1, ids[m]) / temperature, -1)        # [N,K]
    restricted = temperature ** 2 * (p.exp() * (p - q)).sum(-1).mean()
    lp_k = F.log_softmax(teacher_full, -1).gather(-1, ids)
    torch.testing.assert_close(sparse_topk_kl(student, ids, lp_k, mask, False, temperature), restricted)


def test_topk_kl_core_masks_rows_and_ignores_padding():
    """The [N,K] core with a mask equals the core on the valid rows; NaN garbage in padded rows does not leak
    into the value or the gradient."""
    student, ids, lp, mask, _, _ = _kl_fixture()
    m = mask.bool()
    s = F.log_softmax(student, -1).gather(-1, ids).reshape(-1, 4).clone().requires_grad_()  # [B*T,K]
    teacher = lp.reshape(-1, 4).clone()                                                     # [B*T,K]
    teacher[~m.reshape(-1)] = float("nan")
    kl = topk_kl_from_logps(s, teacher, m.reshape(-1))
    assert kl.item() == pytest.approx(sparse_topk_kl(student, ids, lp, mask).item(), abs=1e-12)
    kl.backward()
    assert torch.isfinite(s.grad).all() and (s.grad[~m.reshape(-1)] == 0).all()
    assert topk_kl_from_logps(s[:0], teacher[:0]).item() == 0.0  # no valid token -> 0, not NaN


@pytest.mark.parametrize("tail,temperature", [(True, 1.0), (True, 2.0), (False, 1.0), (False, 0.7)])
def test_topk_kl_gradcheck(tail, temperature):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 12, generator=g, dtype=D, requires_grad=True)     # [B,T,V], small: gradcheck is O(numel)
    teacher_lp = F.log_softmax(2 * torch.randn(2, 3, 12, generator=g, dtype=D), -1)
    teacher_lp, ids = teacher_lp.topk(4, dim=-1)                                  # [B,T,K] each
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.autograd.gradcheck(lambda x: sparse_topk_kl(x, ids, teacher_lp, mask, tail, temperature), (logits,))


# -----------------------------------------------------------------------------
# SFT NLL


def test_sft_nll_hand_derived():
    """Valid log-probs -1, -2, -3 (row 0) and -4 (row 1, two padded tokens): NLL = (1 + 2 + 3 + 4) / 4 = 2.5.
    The padded entries (-100, NaN) must not count."""
    logps = t([[-1.0, -2.0, -3.0], [-4.0, -100.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert sft_nll(logps, mask).item() == pytest.approx(2.5, abs=1e-12)
    assert sft_nll(t([-1.0, -2.0])).item() == pytest.approx(1.5, abs=1e-12)


# -----------------------------------------------------------------------------
# Chunked per-token log-probs


def _head_inputs(n=11, h=6, v=40, k=5, dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(h, v, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g, dtype=dtype))
        head.bias.copy_(torch.randn(v, generator=g, dtype=dtype))
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    target = torch.randint(v, (n,), generator=g)
    topk = torch.randint(v, (n, k), generator=g)
    return hidden, head, target, topk


def test_naive_matches_log_softmax():
    hidden, head, target, topk = _head_inputs()
    logits = head(hidden)
    tgt, tk = token_logps_naive(hidden, head, target, topk, temperature=1.5)
    torch.testing.assert_close(tgt, F.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1))
    torch.testing.assert_close(tk, F.log_softmax(logits / 1.5, -1).gather(-1, topk))


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 16])  # 4 does not divide N = 11; 16 > N
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_matches_naive_values_and_grads(chunk_size, temperature):
    hidden, head, target, topk = _head_inputs()
    params = [hidden, head.weight, head.bias]
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(11, generator=g, dtype=D), torch.randn(11, 5, generator=g, dtype=D)
    results = []
    for fn in (token_logps_naive, token_logps_chunked):
        tgt, tk = fn(hidden, head, target, topk, chunk_size=chunk_size, temperature=temperature)
        grads = torch.autograd.grad((a * tgt).sum() + (b * tk).sum(), params)
        results.append((tgt, tk, *grads))
    for naive, chunked in zip(*results):
        torch.testing.assert_close(chunked, naive)
    tgt, tk = token_logps_chunked(hidden, head, target, None, chunk_size=chunk_size)
    assert tk is None
    torch.testing.assert_close(tgt, results[0][0])


def test_chunked_gradcheck():
    hidden, head, target, topk = _head_inputs(n=5, h=3, v=7, k=2)
    weight, bias = head.weight.detach().clone().requires_grad_(), head.bias.detach().clone().requires_grad_()
    f = lambda x, w, b: token_logps_chunked(x, lambda z: F.linear(z, w, b), target, topk, chunk_size=2,
                                            temperature=1.3)
    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_chunked_saves_no_vocab_sized_tensor_for_backward():
    """Autograd must keep only [n,H]/[n]/[n,K] inputs per chunk; the naive path keeps [N,V] logits."""
    hidden, head, target, topk = _head_inputs(n=12, h=6, v=40, dtype=torch.float32)

    def saved_shapes(fn, **kw):
        shapes = []

        def pack(x):
            shapes.append(tuple(x.shape))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(hidden, head, target, topk, **kw)
        return shapes

    assert (12, 40) in saved_shapes(token_logps_naive)
    assert all(40 not in s for s in saved_shapes(token_logps_chunked, chunk_size=5))


def _grads_of_both(hidden, head, target, topk, params, seed=1, **kw):
    """(values..., grads...) of sum(a * target_logps) + sum(b * topk_logps) for the naive and the chunked path."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(hidden.shape[0], generator=g, dtype=D)
    b = None if topk is None else torch.randn(topk.shape, generator=g, dtype=D)
    results = []
    for fn in (token_logps_naive, token_logps_chunked):
        tgt, tk = fn(hidden, head, target, topk, **kw)
        loss = (a.to(tgt.dtype) * tgt).sum() + (0 if tk is None else (b.to(tk.dtype) * tk).sum())
        results.append([tgt] + ([] if tk is None else [tk]) + list(torch.autograd.grad(loss, params)))
    return results


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("with_topk", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_naive_values_and_grads(chunk_size, temperature, with_topk, bias):
    """The fused Function (nn.Linear head) == naive, for hidden, weight and bias, with and without top-k."""
    hidden, head, target, topk = _head_inputs()
    if not bias:
        head.bias = None
    topk = topk if with_topk else None
    out, _ = token_logps_chunked(hidden, head, target, topk, chunk_size=chunk_size, temperature=temperature)
    assert type(out.grad_fn).__name__ == "_FusedLinearLogpsBackward"  # the fused path, not the fallback
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    naive, fused = _grads_of_both(hidden, head, target, topk, params, chunk_size=chunk_size,
                                  temperature=temperature)
    for x, y in zip(naive, fused, strict=True):
        torch.testing.assert_close(y, x)


def test_fused_and_checkpointed_paths_agree():
    """fused=False (the ZeRO-3 path: the head module is called) gives the same values and grads as fused."""
    hidden, head, target, topk = _head_inputs()
    params = [hidden, head.weight, head.bias]
    grads = []
    for fused in (True, False):
        tgt, tk = token_logps_chunked(hidden, head, target, topk, chunk_size=4, temperature=1.5, fused=fused)
        grads.append([tgt, tk, *torch.autograd.grad(tgt.sum() - 2 * tk.sum(), params)])
    assert type(grads[1][0].grad_fn).__name__ != "_FusedLinearLogpsBackward"
    for x, y in zip(*grads):
        torch.testing.assert_close(y, x)


def test_fused_gradcheck():
    hidden, head, target, topk = _head_inputs(n=5, h=3, v=7, k=2)
    weight, bias = head.weight.detach().clone().requires_grad_(), head.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        linear = torch.nn.Linear(3, 7, dtype=D)
        del linear.weight, linear.bias
        linear.weight, linear.bias = w, b  # plain tensors, not new leaf Parameters: gradcheck differentiates w, b
        return token_logps_chunked(x, linear, target, topk, chunk_size=2, temperature=1.3)

    assert type(f(hidden, weight, bias)[0].grad_fn).__name__ == "_FusedLinearLogpsBackward"
    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_fused_bf16_inputs_close_to_naive():
    """bf16 hidden and head: log-probs come back in fp32, gradients in bf16, close to the naive bf16 path
    (both do the matmuls in bf16 and the softmax math in fp32; fused also accumulates grad_W over chunks in bf16)."""
    hidden, head, target, topk = _head_inputs(n=40, h=16, v=96, k=5, dtype=torch.bfloat16)
    params = [hidden, head.weight, head.bias]
    naive, fused = _grads_of_both(hidden, head, target, topk, params, chunk_size=8, temperature=2.0)
    assert [x.dtype for x in fused] == [torch.float32] * 2 + [torch.bfloat16] * 3
    for x, y in zip(naive, fused, strict=True):
        torch.testing.assert_close(y.double(), x.double(), rtol=1e-2, atol=1e-2 * x.abs().max().item())


def test_fused_frozen_head_and_tied_weight():
    """A frozen head gets no gradient (only hidden does); a weight also used elsewhere (tied embeddings) gets
    the sum of both gradients, as with the naive path."""
    hidden, head, target, topk = _head_inputs()
    head.requires_grad_(False)
    tgt, tk = token_logps_chunked(hidden, head, target, topk, chunk_size=4)
    (grad_h,) = torch.autograd.grad(tgt.sum() + tk.sum(), [hidden])
    naive_tgt, naive_tk = token_logps_naive(hidden, head, target, topk)
    torch.testing.assert_close(grad_h, torch.autograd.grad(naive_tgt.sum() + naive_tk.sum(), [hidden])[0])
    head.requires_grad_(True)
    grads = []
    for fn in (token_logps_naive, token_logps_chunked):
        tgt, _ = fn(hidden, head, target, None, chunk_size=4)
        grads.append(torch.autograd.grad(tgt.sum() + head.weight.square().sum(), [head.weight])[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_fused_refuses_a_partitioned_weight():
    """Under ZeRO-3 a head's weight outside its module's forward is an empty placeholder: fused must refuse."""
    hidden, head, target, topk = _head_inputs()
    head.weight.data = torch.empty(0, dtype=D)
    with pytest.raises(ValueError, match="fused=False"):
        token_logps_chunked(hidden, head, target, topk)


# -----------------------------------------------------------------------------
# Combined loss and presets


def test_presets():
    assert set(PRESETS) == {"dsft", "ddpo", "dadpo", "dadpo_tok", "kd"}
    assert (PRESETS["dadpo"].beta1, PRESETS["dadpo"].beta2) == (0.1, 0.05)
    assert PRESETS["ddpo"].beta2 == 0.0 and PRESETS["dadpo_tok"].w_tok == 1.0
    assert (PRESETS["dsft"].w_pref, PRESETS["dsft"].w_tok) == (0.0, 0.0)
    assert (PRESETS["kd"].w_pref, PRESETS["kd"].w_sft) == (0.0, 0.0)
    for bad in (dict(w_pref=0.0), dict(beta1=-0.1), dict(label_smoothing=0.5), dict(temperature=0.0),
                dict(beta1=0.0, beta2=0.0)):
        with pytest.raises(ValueError):
            LossWeights(**bad)


def _combined_inputs():
    lp_c, lp_r, ref_c, ref_r, tch_c, tch_r = (x[:4] for x in _random_pairs(seed=3))
    student, ids, lp, mask, _, _ = _kl_fixture()
    chosen_tok = -torch.rand(2, 5, dtype=D)
    return dict(policy_chosen_logps=lp_c, policy_rejected_logps=lp_r, ref_chosen_logps=ref_c,
                ref_rejected_logps=ref_r, teacher_chosen_logps=tch_c, teacher_rejected_logps=tch_r,
                chosen_token_logps=chosen_tok, chosen_mask=mask,
                student_topk_logps=F.log_softmax(student, -1).gather(-1, ids).reshape(-1, 4),
                teacher_topk_logps=lp.reshape(-1, 4), topk_mask=mask.reshape(-1))


def test_combined_loss_is_weighted_sum():
    x = _combined_inputs()
    w = LossWeights(w_pref=0.5, beta1=0.2, beta2=0.1, label_smoothing=0.1, w_tok=2.0, w_sft=0.3, tail=False,
                    temperature=1.0)
    out = combined_loss(w, **x)
    args = [x[k] for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                           "ref_rejected_logps", "teacher_chosen_logps", "teacher_rejected_logps")]
    pref = dadpo_loss(*args, 0.2, 0.1, 0.1).mean()
    tok = topk_kl_from_logps(x["student_topk_logps"], x["teacher_topk_logps"], x["topk_mask"], tail=False)
    sft = sft_nll(x["chosen_token_logps"], x["chosen_mask"])
    torch.testing.assert_close(out["loss"], 0.5 * pref + 2.0 * tok + 0.3 * sft)
    assert (out["pref"], out["tok"], out["sft"]) == (pref.item(), tok.item(), sft.item())
    margin, chosen_r, rejected_r = dadpo_margin(*args, 0.2, 0.1)
    assert out["margin"] == pytest.approx(margin.mean().item())
    assert out["reward_acc"] == pytest.approx((chosen_r > rejected_r).double().mean().item())
    assert out["chosen_reward"] == pytest.approx(chosen_r.mean().item())
    assert out["rejected_reward"] == pytest.approx(rejected_r.mean().item())
    assert all(isinstance(v, float) for k, v in out.items() if k != "loss")


def test_combined_loss_skips_zero_weight_terms():
    """Skipped terms need no inputs and report NaN; ddpo needs no teacher sequence log-probs."""
    x = _combined_inputs()
    sft_only = combined_loss(PRESETS["dsft"], chosen_token_logps=x["chosen_token_logps"],
                             chosen_mask=x["chosen_mask"])
    torch.testing.assert_close(sft_only["loss"], sft_nll(x["chosen_token_logps"], x["chosen_mask"]))
    assert math.isnan(sft_only["pref"]) and math.isnan(sft_only["tok"]) and math.isnan(sft_only["margin"])
    x_no_teacher = {k: v for k, v in x.items() if not k.startswith("teacher_chosen")
                    and not k.startswith("teacher_rejected")}
    ddpo = combined_loss(PRESETS["ddpo"], **x_no_teacher)
    assert math.isnan(ddpo["tok"]) and math.isnan(ddpo["sft"])
    with pytest.raises(ValueError, match="teacher_chosen_logps"):
        combined_loss(PRESETS["dadpo"], **x_no_teacher)


def test_combined_loss_backward_reaches_all_active_inputs():
    x = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in _combined_inputs().items()}
    out = combined_loss(LossWeights(w_tok=1.0, w_sft=1.0), **x)
    out["loss"].backward()
    for k in ("policy_chosen_logps", "policy_rejected_logps", "chosen_token_logps", "student_topk_logps"):
        assert x[k].grad is not None and x[k].grad.abs().sum() > 0, k
