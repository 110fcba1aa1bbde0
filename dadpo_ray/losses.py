"""Losses for distilling a teacher into a student: DPO, daDPO, sparse top-k KL, SFT NLL.

Pure torch: tensors and floats in, tensors out. Notation, per example:
    y_t  teacher response (chosen),   y_s  student response (rejected)
    lp_c, lp_r    log pi_theta(y_t|x), log pi_theta(y_s|x)   student policy, summed over response tokens
    ref_c, ref_r  same under pi_ref, the frozen dSFT student
    tch_c, tch_r  same under pi_tch, the teacher

References:
    [DPO]   Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, Eq. 7.
    [cDPO]  Mitchell 2023, "A note on DPO with noisy preferences" (conservative DPO, label smoothing eps).
    [daDPO] "Distribution-Aware DPO for Distilling Conversational Abilities", 2025 (the daDPO objective:
            the DPO margin plus a log-ratio term toward the teacher).
    [KD]    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (temperature, T^2 factor).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _fp32(x):
    """Upcast to at least float32 (bf16/fp16 -> fp32, fp64 stays fp64 so gradcheck works)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# -----------------------------------------------------------------------------
# Sequence-level preference losses


def _smoothed_sigmoid_loss(margin, label_smoothing):
    """-(1-eps) log sigmoid(m) - eps log sigmoid(-m)   [cDPO]; eps = 0 is plain [DPO] Eq. 7."""
    return -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def dadpo_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 teacher_chosen_logps, teacher_rejected_logps, beta1, beta2):
    """Per-example daDPO margin m and the implicit DPO rewards.

        m = b1 [(lp_c - ref_c) - (lp_r - ref_r)]  +  b2 [(lp_c - tch_c) - (lp_r - tch_r)]     [daDPO]

    Equivalently m = (b1 + b2)(lp_c - lp_r) - b1 (ref_c - ref_r) - b2 (tch_c - tch_r): DPO with
    beta = b1 + b2 against the geometric mixture pi_ref^(b1/(b1+b2)) * pi_tch^(b2/(b1+b2)).
    With b2 == 0 the teacher term is not added (teacher log-probs may be None) and m is exactly the
    DPO logit. Returns (margin [B] with grad, chosen_reward [B], rejected_reward [B]); the rewards
    b1 (lp - ref) are detached and only for logging, as in TRL.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps        # log pi/pi_ref on y_t, [B]
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # log pi/pi_ref on y_s, [B]
    margin = beta1 * (chosen_ratio - rejected_ratio)
    if beta2 != 0:
        margin = margin + beta2 * ((policy_chosen_logps - teacher_chosen_logps)
                                   - (policy_rejected_logps - teacher_rejected_logps))
    return margin, (beta1 * chosen_ratio).detach(), (beta1 * rejected_ratio).detach()


def dadpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               teacher_chosen_logps, teacher_rejected_logps, beta1, beta2, label_smoothing=0.0):
    """Per-example daDPO loss -log sigmoid(m) (cDPO-smoothed), m from `dadpo_margin`. Shape [B]."""
    margin, _, _ = dadpo_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                ref_rejected_logps, teacher_chosen_logps, teacher_rejected_logps,
                                beta1, beta2)
    return _smoothed_sigmoid_loss(margin, label_smoothing)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, label_smoothing=0.0):
    """Per-example sigmoid DPO loss [DPO] Eq. 7 with [cDPO] smoothing: daDPO with beta2 = 0. Shape [B]."""
    return dadpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps, None, None, beta, 0.0, label_smoothing)


# -----------------------------------------------------------------------------
# Token-level losses


def sft_nll(token_logps, mask=None):
    """Mean negative log-likelihood over valid tokens: -sum(mask * logp) / sum(mask).

    token_logps: [B,T] or [N] log-probs of the chosen (teacher) tokens; mask: same shape, bool/0-1,
    or None for all valid. Padded positions are dropped by indexing, so garbage there cannot leak
    NaNs into the gradient. Returns 0 when no token is valid.
    """
    if mask is not None:
        token_logps = token_logps[mask.bool()]  # [N] valid tokens only
    return -token_logps.sum() / max(token_logps.numel(), 1)


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, clamped at the dtype's resolution: the tail mass 1 - sum_k p_k
    is a difference of numbers near 1, so anything below eps is rounding noise (and K = V gives 0)."""
    return torch.log(torch.clamp(-torch.expm1(x), min=torch.finfo(x.dtype).eps))


def topk_kl_from_logps(student_topk_logps, teacher_topk_logps, mask=None, tail=True, temperature=1.0):
    """Forward KL(teacher || student) per token on the teacher's sparse top-k support, mean over valid tokens.

    student_topk_logps: [N,K] log q_k = log_softmax(z_s / T) at the teacher's ids (the temperature is
        applied by the caller, e.g. `token_logps_chunked(..., temperature=T)`).
    teacher_topk_logps: [N,K] log p_k from the teacher's raw logits at T = 1.
    mask: [N] bool/0-1 or None. Rows are selected before the KL, so padding never reaches the math.

    tail=True (default): K buckets plus one tail bucket holding the remaining mass on both sides,
        p_tail = 1 - sum_k p_k, q_tail = 1 - sum_k q_k; KL = sum_{b in K+1} p_b (log p_b - log q_b).
        By the data processing inequality this lower-bounds the dense KL, with equality when p/q is
        constant over the tail. Temperature: the teacher's K+1 buckets are tempered as p_b^(1/T) and
        renormalised. This is exact at T = 1 and on the K buckets' ratios, but an approximation
        for the tail: the true tempered tail is sum_{v in tail} p_v^(1/T), not (sum_v p_v)^(1/T).
    tail=False: both sides renormalised over the top-k, p_hat = softmax(log p / T), q_hat = softmax(log q).
        Tempering here is exact: log p_k / T = z_k / T + const, so this is the tempered teacher restricted to top-k.
    The KL is multiplied by T^2 [KD] so gradient scale does not depend on T. With K = V both modes
    equal the dense KL. Returns a scalar (0 if no valid token).
    """
    lq, lp = _fp32(student_topk_logps), _fp32(teacher_topk_logps)
    if mask is not None:
        lq, lp = lq[mask.bool()], lp[mask.bool()]  # [N_valid,K]
    if tail:
        lp = torch.cat([lp, _log1mexp(lp.logsumexp(-1, keepdim=True))], dim=-1)  # [N,K+1]
        lq = torch.cat([lq, _log1mexp(lq.logsumexp(-1, keepdim=True))], dim=-1)  # [N,K+1]
        if temperature != 1.0:
            lp = F.log_softmax(lp / temperature, dim=-1)  # p_b^(1/T) / sum_b p_b^(1/T)
    else:
        lp = F.log_softmax(lp / temperature, dim=-1)  # [N,K] tempered teacher, renormalised on top-k
        lq = F.log_softmax(lq, dim=-1)                # [N,K] student, renormalised on top-k
    kl = (lp.exp() * (lp - lq)).sum(-1) * temperature ** 2  # [N]
    return kl.sum() / max(kl.numel(), 1)


def sparse_topk_kl(student_logits, topk_ids, topk_logprobs, mask, tail=True, temperature=1.0):
    """Convenience form of `topk_kl_from_logps` from full student logits (tests, small models).

    student_logits [B,T,V], topk_ids [B,T,K] long, topk_logprobs [B,T,K] teacher log-probs at T = 1,
    mask [B,T] bool/0-1. Student side: log_softmax(logits / T) in fp32, gathered at the teacher's ids.
    """
    m = mask.bool()
    logits = _fp32(student_logits[m])                                           # [N,V]
    student_topk = F.log_softmax(logits / temperature, -1).gather(-1, topk_ids[m])  # [N,K]
    return topk_kl_from_logps(student_topk, topk_logprobs[m], None, tail, temperature)


# -----------------------------------------------------------------------------
# Per-token log-probs from hidden states, chunked over tokens


def _head_logps(hidden, head, target_ids, topk_ids, temperature):
    """hidden [n,H] -> (log p(target) at T = 1 [n], log softmax(z / T) at topk_ids [n,K] or None)."""
    logits = _fp32(head(hidden))                                                 # [n,V] fp32
    target_logps = logits.gather(-1, target_ids[:, None]).squeeze(-1) - logits.logsumexp(-1)  # [n]
    if topk_ids is None:
        return target_logps, None
    scaled = logits / temperature                                                # [n,V]
    topk_logps = scaled.gather(-1, topk_ids) - scaled.logsumexp(-1, keepdim=True)  # [n,K]
    return target_logps, topk_logps


def token_logps_naive(hidden, head, target_ids, topk_ids=None, chunk_size=None, temperature=1.0):
    """Reference for `token_logps_chunked`: all [N,V] logits at once (chunk_size is ignored)."""
    return _head_logps(hidden, head, target_ids, topk_ids, temperature)


def _chunk_logits(h, weight, bias):
    """[n,H] -> [n,V] logits in at least fp32: the matmul in the inputs' dtype, then the upcast."""
    return _fp32(F.linear(h, weight, bias))


class _FusedLinearLogps(torch.autograd.Function):
    """(target_logps [N], topk_logps [N,K] or None) = log-probs of softmax(h W^T + b) (and of its /T), chunked.

    Forward keeps only hidden, W, b, the ids and per-token logsumexps lse = logsumexp_v z, lse_T = logsumexp_v z/T.
    Backward recomputes each chunk's logits z (one matmul) and, with the upstream g_t [n], g_k [n,K], forms
        dL/dz = g_t (onehot(target) - softmax(z)) + (1/T) sum_k g_k (onehot(topk_k) - softmax(z/T))
    in place in z's buffer, then grad_h[chunk] = dL/dz @ W and grad_W += dL/dz^T @ h_chunk (addmm_ into one
    [V,H] buffer), grad_b += sum_rows dL/dz. So neither [N,V] logits nor per-chunk [V,H] temporaries exist.
    Math in fp32 (fp64 stays fp64); dL/dz is cast to W's dtype for the two matmuls, and grad_W accumulates in
    W's dtype (exact for fp32, bf16 rounding per chunk for bf16 weights, as Liger's default).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, topk_ids, chunk_size, temperature):
        n_tok = hidden.shape[0]
        out_dtype = torch.promote_types(weight.dtype, torch.float32)                     # as _chunk_logits
        target_logps = torch.empty(n_tok, dtype=out_dtype, device=hidden.device)        # [N]
        lse = torch.empty(n_tok, dtype=out_dtype, device=hidden.device)                 # [N]
        topk_logps = lse_t = None
        if topk_ids is not None:
            topk_logps = torch.empty(topk_ids.shape, dtype=out_dtype, device=hidden.device)  # [N,K]
            lse_t = lse if temperature == 1.0 else torch.empty_like(lse)                    # [N]
        for i in range(0, n_tok, chunk_size):
            s = slice(i, i + chunk_size)
            z = _chunk_logits(hidden[s], weight, bias)                                      # [n,V]
            torch.logsumexp(z, -1, out=lse[s])
            target_logps[s] = z.gather(-1, target_ids[s, None]).squeeze(-1) - lse[s]
            if topk_ids is not None:
                if temperature != 1.0:
                    z.div_(temperature)                                                     # z / T in place
                    torch.logsumexp(z, -1, out=lse_t[s])
                topk_logps[s] = z.gather(-1, topk_ids[s]) - lse_t[s, None]
        # The parameters are kept on ctx, not in save_for_backward: they are held anyway, and saved-tensor hooks
        # (activation offloading) must not copy a [V,H] weight per call. Their versions are checked in backward.
        ctx.weight, ctx.bias = weight, bias
        ctx.versions = (weight._version, None if bias is None else bias._version)
        ctx.save_for_backward(hidden, target_ids, topk_ids, lse, lse_t)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.set_materialize_grads(False)
        return target_logps, topk_logps

    @staticmethod
    def backward(ctx, g_target, g_topk):
        hidden, target_ids, topk_ids, lse, lse_t = ctx.saved_tensors
        weight, bias, temperature = ctx.weight, ctx.bias, ctx.temperature
        if ctx.versions != (weight._version, None if bias is None else bias._version):
            raise RuntimeError("token_logps_chunked: the head's weight or bias was modified in place before backward")
        if g_target is None and g_topk is None:
            return None, None, None, None, None, None, None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None                          # [N,H]
        grad_w = torch.zeros_like(weight) if need_w else None                          # [V,H], the one buffer
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None       # [V]
        for i in range(0, hidden.shape[0], ctx.chunk_size):
            s = slice(i, i + ctx.chunk_size)
            h = hidden[s]                                                               # [n,H]
            z = _chunk_logits(h, weight, bias)                                          # [n,V]
            gt = None if g_target is None else g_target[s]                             # [n]
            gk = None if g_topk is None else g_topk[s] / temperature                   # [n,K], the 1/T included
            if gk is not None and temperature != 1.0:
                p_t = (z / temperature).sub_(lse_t[s, None]).exp_()                     # softmax(z/T), [n,V]
                p_t.mul_(-gk.sum(-1, keepdim=True))
            coef = 0.0 if gt is None else gt                                            # weight of -softmax(z)
            if gk is not None and temperature == 1.0:
                coef = coef + gk.sum(-1)                                                # same softmax at T = 1
            dz = z.sub_(lse[s, None]).exp_()                                            # softmax(z) in z's buffer
            if isinstance(coef, float):
                dz.zero_()
            else:
                dz.mul_(-coef[:, None])
            if gk is not None and temperature != 1.0:
                dz.add_(p_t)
                del p_t
            if gt is not None:
                dz.scatter_add_(1, target_ids[s, None], gt[:, None].to(dz.dtype))
            if gk is not None:
                dz.scatter_add_(1, topk_ids[s], gk.to(dz.dtype))
            dz = dz.to(weight.dtype)                                                    # [n,V], no-op in fp32
            if need_h:
                torch.mm(dz, weight, out=grad_h[s])                                     # [n,H]
            if need_w:
                grad_w.addmm_(dz.t(), h)                                                # [V,H] += [V,n] @ [n,H]
            if grad_b is not None:
                grad_b.add_(dz.sum(0))
        return grad_h, grad_w, grad_b, None, None, None, None


def token_logps_chunked(hidden, head, target_ids, topk_ids=None, chunk_size=512, temperature=1.0, *, fused=True):
    """Per-token log-probs without ever holding [N,V] logits.

    hidden: [N,H] last hidden states at the N response positions (already selected).
    head: the LM head: an nn.Linear (model.get_output_embeddings()), or any callable [n,H] -> [n,V] logits.
    target_ids: [N] long, the next tokens; topk_ids: [N,K] long teacher ids, or None.
    Returns (target_logps [N] at T = 1, topk_logps [N,K] = log_softmax(z / T) at topk_ids, or None), in at least
    fp32; values and gradients equal `token_logps_naive`'s.

    fused=True and an nn.Linear head: `_FusedLinearLogps` uses head.weight / head.bias directly. It keeps only
    per-token logsumexps from the forward and recomputes each chunk's logits once in the backward, accumulating
    the weight gradient in place: peak memory is a few [chunk,V] fp32 buffers plus one [V,H] gradient.
    Otherwise (fused=False, or a head that is not an nn.Linear) each chunk runs under torch.utils.checkpoint
    (use_reentrant=False) and calls the head *module*: slower and more memory (a [V,H] gradient per chunk), but
    module hooks fire in the forward and again in the recomputation. Under DeepSpeed ZeRO-3 the head's weight is
    partitioned and only those hooks gather it, so ZeRO-3 training must pass fused=False (train_worker does:
    fused = zero_stage < 3). A fused call on an empty (partitioned) weight raises instead of computing garbage.
    """
    if fused and isinstance(head, torch.nn.Linear):
        if head.weight.numel() == 0:
            raise ValueError("token_logps_chunked: the head's weight is empty (partitioned, e.g. by ZeRO-3); "
                             "pass fused=False so the head module's hooks gather it")
        return _FusedLinearLogps.apply(hidden, head.weight, head.bias, target_ids, topk_ids, chunk_size,
                                       temperature)
    target_out, topk_out = [], []
    for i in range(0, hidden.shape[0], chunk_size):
        ids = None if topk_ids is None else topk_ids[i:i + chunk_size]  # [n,K]
        t, k = checkpoint(_head_logps, hidden[i:i + chunk_size], head, target_ids[i:i + chunk_size],
                          ids, temperature, use_reentrant=False)
        target_out.append(t)
        topk_out.append(k)
    target_logps = torch.cat(target_out)                                    # [N]
    topk_logps = None if topk_ids is None else torch.cat(topk_out)           # [N,K]
    return target_logps, topk_logps


# -----------------------------------------------------------------------------
# Combined objective L = w_pref L_pref + w_tok L_tok + w_sft L_sft


@dataclass(frozen=True)
class LossWeights:
    """Weights and hyper-parameters of L = w_pref * L_pref + w_tok * L_tok + w_sft * L_sft."""

    w_pref: float = 1.0          # weight of the sequence-level daDPO/DPO term L_pref (mean over pairs)
    beta1: float = 0.1           # daDPO b1: strength of the log-ratio to the reference (dSFT) model; DPO's beta
    beta2: float = 0.05          # daDPO b2: strength of the log-ratio to the teacher; 0 gives plain DPO (dDPO)
    label_smoothing: float = 0.0  # cDPO eps in [0, 0.5): assumed probability that a preference label is flipped
    w_tok: float = 0.0           # weight of the token-level sparse top-k KL(teacher || student) L_tok
    w_sft: float = 0.0           # weight of the NLL of the teacher's response L_sft (dSFT)
    tail: bool = True            # L_tok keeps a tail bucket (True) or renormalises both sides on top-k (False)
    temperature: float = 1.0     # L_tok distillation temperature T (student log-probs must be taken at T)

    def __post_init__(self):
        if min(self.w_pref, self.w_tok, self.w_sft, self.beta1, self.beta2) < 0:
            raise ValueError(f"weights and betas must be >= 0: {self}")
        if self.w_pref + self.w_tok + self.w_sft == 0:
            raise ValueError("at least one of w_pref, w_tok, w_sft must be > 0")
        if self.w_pref > 0 and self.beta1 + self.beta2 == 0:
            raise ValueError("w_pref > 0 needs beta1 + beta2 > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


# The daDPO paper does not publish its beta1/beta2; 0.1 / 0.05 are our defaults, not the paper's.
PRESETS: dict[str, LossWeights] = {
    "dsft": LossWeights(w_pref=0.0, w_sft=1.0),                               # SFT on teacher responses
    "ddpo": LossWeights(w_pref=1.0, beta1=0.1, beta2=0.0),                    # dDPO: DPO, y_t > y_s
    "dadpo": LossWeights(w_pref=1.0, beta1=0.1, beta2=0.05),                  # daDPO
    "dadpo_tok": LossWeights(w_pref=1.0, beta1=0.1, beta2=0.05, w_tok=1.0),   # daDPO + token KL
    "kd": LossWeights(w_pref=0.0, w_tok=1.0),                                 # token KL only
}


def _required(name, x):
    if x is None:
        raise ValueError(f"combined_loss: `{name}` is required by the active loss terms")
    return x


def combined_loss(weights, *, policy_chosen_logps=None, policy_rejected_logps=None,
                  ref_chosen_logps=None, ref_rejected_logps=None, teacher_chosen_logps=None,
                  teacher_rejected_logps=None, chosen_token_logps=None, chosen_mask=None,
                  student_topk_logps=None, teacher_topk_logps=None, topk_mask=None):
    """L = w_pref L_pref + w_tok L_tok + w_sft L_sft; terms with weight 0 are not computed.

    Inputs as in `dadpo_loss` ([B] sequence log-probs), `sft_nll` (chosen_token_logps, chosen_mask)
    and `topk_kl_from_logps` (student_topk_logps at weights.temperature, teacher_topk_logps, topk_mask).
    Only the inputs of active terms are needed (teacher sequence log-probs only if beta2 > 0).
    Returns {"loss": scalar tensor with grad} plus detached float metrics pref, tok, sft, margin,
    reward_acc, chosen_reward, rejected_reward (batch means); metrics of skipped terms are NaN.
    """
    w = weights
    nan = float("nan")
    out = dict(pref=nan, tok=nan, sft=nan, margin=nan, reward_acc=nan, chosen_reward=nan,
               rejected_reward=nan)
    loss = 0.0
    if w.w_pref > 0:
        margin, chosen_r, rejected_r = dadpo_margin(
            _required("policy_chosen_logps", policy_chosen_logps),
            _required("policy_rejected_logps", policy_rejected_logps),
            _required("ref_chosen_logps", ref_chosen_logps),
            _required("ref_rejected_logps", ref_rejected_logps),
            teacher_chosen_logps if w.beta2 == 0 else _required("teacher_chosen_logps", teacher_chosen_logps),
            teacher_rejected_logps if w.beta2 == 0 else _required("teacher_rejected_logps", teacher_rejected_logps),
            w.beta1, w.beta2)
        pref = _smoothed_sigmoid_loss(margin, w.label_smoothing).mean()
        loss = loss + w.w_pref * pref
        out.update(pref=pref.item(), margin=margin.detach().mean().item(),
                   reward_acc=(chosen_r > rejected_r).float().mean().item(),
                   chosen_reward=chosen_r.mean().item(), rejected_reward=rejected_r.mean().item())
    if w.w_tok > 0:
        tok = topk_kl_from_logps(_required("student_topk_logps", student_topk_logps),
                                 _required("teacher_topk_logps", teacher_topk_logps),
                                 topk_mask, w.tail, w.temperature)
        loss = loss + w.w_tok * tok
        out["tok"] = tok.item()
    if w.w_sft > 0:
        sft = sft_nll(_required("chosen_token_logps", chosen_token_logps), chosen_mask)
        loss = loss + w.w_sft * sft
        out["sft"] = sft.item()
    out["loss"] = loss
    return out
