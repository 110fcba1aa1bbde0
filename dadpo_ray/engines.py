"""Inference engines behind the generation actors: sample responses, score given responses.

Both backends keep one contract: `sample()` returns (response token ids, finish reason) per prompt, the ids
ending with the EOS token when the model stopped by itself; `score()` returns `scoring.Scored` per response,
aligned as `dadpo_ray.records` describes; `sample_and_score()` returns both for the model's own samples, which
the `hf` backend gets from one `generate()` call (its raw step logits) instead of a second forward pass.

- `hf`: transformers `generate()` on left-padded batches (CPU or GPU). Tested.
- `vllm`: vLLM's `LLM` engine (GPU only). Imported only when chosen; untested here (no GPU on CI).
"""

from __future__ import annotations

import torch

from dadpo_ray.config import GenerateConfig, ModelSpec
from dadpo_ray.models import load_model, load_tokenizer
from dadpo_ray.scoring import Scored, left_pad, score_from_step_logits, score_responses

# Scoring from generate()'s step logits holds B x max_new_tokens x V fp32 values; past this, a batch is scored
# with a second forward pass instead (same numbers, less memory).
STEP_LOGITS_BUDGET_BYTES = 1 << 30


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | {tokenizer.eos_token_id}


class HFEngine:
    def __init__(self, spec: ModelSpec, num_threads: int | None = None):
        if num_threads and not torch.cuda.is_available():
            torch.set_num_threads(num_threads)  # match the actor's CPU reservation
        self.tokenizer = load_tokenizer(spec)
        self.model = load_model(spec)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.eos = eos_ids(self.model, self.tokenizer)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], gen: GenerateConfig, seed: int, keep_logits: bool):
        """(response ids, finish reason) per prompt, and the raw step logits when keep_logits."""
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        torch.manual_seed(seed)
        sampling = dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p) if gen.temperature > 0 \
            else dict(do_sample=False)
        out = self.model.generate(
            input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
            max_new_tokens=gen.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos), output_logits=keep_logits, return_dict_in_generate=True, **sampling,
        )
        results = []
        for row in out.sequences[:, ids.shape[1]:].tolist():
            stop = next((j for j, t in enumerate(row) if t in self.eos), None)
            results.append((row[: stop + 1], "stop") if stop is not None else (row, "length"))
        return results, out.logits

    def sample(self, prompts: list[list[int]], gen: GenerateConfig, seed: int) -> list[tuple[list[int], str]]:
        return self._generate(prompts, gen, seed, keep_logits=False)[0]

    def score(self, prompts: list[list[int]], responses: list[list[int]], k: int | None) -> list[Scored]:
        return score_responses(self.model, prompts, responses, k, self.tokenizer.pad_token_id)

    def sample_and_score(self, prompts: list[list[int]], gen: GenerateConfig, seed: int, k: int | None):
        """sample() and score() of those samples, from one generate() call while its logits fit the budget."""
        step_logits_bytes = len(prompts) * gen.max_new_tokens * self.model.config.vocab_size * 4
        if step_logits_bytes > STEP_LOGITS_BUDGET_BYTES:
            samples = self.sample(prompts, gen, seed)
            return samples, self.score(prompts, [ids for ids, _ in samples], k)
        samples, step_logits = self._generate(prompts, gen, seed, keep_logits=True)
        return samples, score_from_step_logits(step_logits, [ids for ids, _ in samples], k)


class VLLMEngine:
    """Same contract on vLLM: sampling with a seed, scoring through prompt_logprobs (raw, temperature 1)."""

    def __init__(self, spec: ModelSpec, num_threads: int | None = None):
        from vllm import LLM  # optional dependency, GPU only

        self.llm = LLM(model=spec.path, revision=spec.revision, dtype=spec.dtype,
                       trust_remote_code=spec.trust_remote_code)
        self.tokenizer = self.llm.get_tokenizer()

    def sample(self, prompts, gen: GenerateConfig, seed: int):
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=gen.temperature, top_p=gen.top_p, max_tokens=gen.max_new_tokens,
                                seed=seed)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        return [(list(o.outputs[0].token_ids), "length" if o.outputs[0].finish_reason == "length" else "stop")
                for o in outputs]

    def sample_and_score(self, prompts, gen: GenerateConfig, seed: int, k: int | None):
        # Two passes on purpose: vLLM's sampling logprobs may be post-processing (logprobs_mode), prompt_logprobs
        # of score() are raw.
        samples = self.sample(prompts, gen, seed)
        return samples, self.score(prompts, [ids for ids, _ in samples], k)

    def score(self, prompts, responses, k):
        from vllm import SamplingParams, TokensPrompt

        # prompt_logprobs=k returns, per prompt position, the actual token's log-prob plus the top-k.
        params = SamplingParams(max_tokens=1, prompt_logprobs=k or 1)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompts, responses)], params
        )
        results = []
        for o, p, r in zip(outputs, prompts, responses):
            positions = o.prompt_logprobs[len(p):]  # entry j: distribution that predicted response token j
            logp = sum(pos[t].logprob for pos, t in zip(positions, r))
            if k:
                top = [sorted(pos.items(), key=lambda kv: kv[1].rank)[:k] for pos in positions]
                results.append(Scored(logp, [[t for t, _ in row] for row in top],
                                      [[lp.logprob for _, lp in row] for row in top]))
            else:
                results.append(Scored(logp, None, None))
        return results


def make_engine(backend: str, spec: ModelSpec, num_threads: int | None = None):
    return (VLLMEngine if backend == "vllm" else HFEngine)(spec, num_threads)
