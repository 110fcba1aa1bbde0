"""The on-disk data contract between generation and training: Parquet schema + `manifest.json`.

This module is the only place that knows the columns. Generation validates rows before writing; training
validates the manifest (and the student's tokenizer) before reading.

One row = one prompt with its two answers:

    id                      unique row id (from the prompt set, or a stable hash of the prompt)
    split                   "train" or "eval" (held out by a hash of the id; eval rows never reach training)
    prompt_messages         the chat as given: list of {role, content}; multi-turn chats keep earlier turns
    prompt_ids              chat-templated prompt token ids (with the assistant header)
    chosen_ids/_text/_finish      y_t, the teacher's sampled answer ("stop" or "length")
    rejected_ids/_text/_finish    y_s, the student's sampled answer
    teacher_chosen_logp, teacher_rejected_logp    log p_teacher(y | prompt), summed over response tokens
    ref_chosen_logp, ref_rejected_logp            log p_reference(y | prompt), likewise
    chosen_topk_ids/_logprobs     the teacher's sparse top-k on y_t: one list of k per response token
    rejected_topk_ids/_logprobs   the same on y_s (null unless generate.topk_for_rejected)

Alignment rule (tested in tests/test_records.py): top-k row j of a response is the teacher's distribution for
predicting response token j given the prompt and response tokens 0..j-1, i.e. log_softmax(logits) at position
len(prompt) + j - 1 of the teacher's forward pass over prompt + response. It is taken from the raw model
distribution at temperature 1 (never the sampling-processed scores), so `len(chosen_topk_ids) == len(chosen_ids)`
and the summed log-prob equals the sum of each token's log-prob in that same distribution.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dadpo_ray.errors import DadpoError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
SHARD_GLOB = "part-*.parquet"

_ids = pa.list_(pa.int32())
_topk_ids = pa.list_(pa.list_(pa.int32()))
_topk_logprobs = pa.list_(pa.list_(pa.float32()))
_message = pa.struct([("role", pa.string()), ("content", pa.string())])

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("prompt_messages", pa.list_(_message), nullable=False),
        pa.field("prompt_ids", _ids, nullable=False),
        pa.field("chosen_ids", _ids, nullable=False),
        pa.field("chosen_text", pa.string(), nullable=False),
        pa.field("chosen_finish", pa.string(), nullable=False),
        pa.field("rejected_ids", _ids, nullable=False),
        pa.field("rejected_text", pa.string(), nullable=False),
        pa.field("rejected_finish", pa.string(), nullable=False),
        pa.field("teacher_chosen_logp", pa.float64(), nullable=False),
        pa.field("teacher_rejected_logp", pa.float64(), nullable=False),
        pa.field("ref_chosen_logp", pa.float64(), nullable=False),
        pa.field("ref_rejected_logp", pa.float64(), nullable=False),
        pa.field("chosen_topk_ids", _topk_ids, nullable=False),
        pa.field("chosen_topk_logprobs", _topk_logprobs, nullable=False),
        pa.field("rejected_topk_ids", _topk_ids, nullable=True),
        pa.field("rejected_topk_logprobs", _topk_logprobs, nullable=True),
    ],
    metadata={"dadpo_ray.schema_version": str(SCHEMA_VERSION)},
)
COLUMNS = SCHEMA.names
LOGP_COLUMNS = ["teacher_chosen_logp", "teacher_rejected_logp", "ref_chosen_logp", "ref_rejected_logp"]


# ------------------------------------------------------------------------------------------------ manifest
class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRecord(_Frozen):
    path: str  # as given in the config (hub id, dir or built-in name)
    revision: str | None = None


class Manifest(_Frozen):
    """What makes a dataset self-describing; written last, so its presence means the dataset is complete."""

    schema_version: int = SCHEMA_VERSION
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    config_fingerprint: str  # hash of the config sections that shaped the data (models, prompts, generate)
    teacher: ModelRecord
    student: ModelRecord
    reference: ModelRecord
    vocab_size: int
    vocab_hash: str
    topk: int
    topk_for_rejected: bool
    generation: dict  # backend, temperature, top_p, max_new_tokens, max_prompt_tokens, seed
    rows: dict[str, int]  # per split: {"train": n, "eval": n}
    rejected_rows: int
    rejected_reasons: dict[str, int]
    files: list[str]


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Local path or any URI pyarrow understands (s3://, gs://, ...)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def _write_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_text(out_dir: str, name: str, text: str) -> None:
    fs, root = _filesystem(out_dir)
    fs.create_dir(root, recursive=True)
    _write_atomically(fs, f"{root}/{name}", text.encode())


def read_text(data_dir: str, name: str) -> str | None:
    """A small file of the dataset dir, or None if it is not there."""
    fs, root = _filesystem(data_dir)
    try:
        with fs.open_input_stream(f"{root}/{name}") as f:
            return f.read().decode()
    except FileNotFoundError:
        return None


def list_names(data_dir: str) -> list[str]:
    fs, root = _filesystem(data_dir)
    try:
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root)))
    except FileNotFoundError:
        return []


def delete(data_dir: str, names: list[str] | None = None) -> None:
    """Delete the named files of a dataset dir, or the whole dir when names is None."""
    fs, root = _filesystem(data_dir)
    if names is None:
        fs.delete_dir(root)
    for name in names or []:
        fs.delete_file(f"{root}/{name}")


def write_manifest(out_dir: str, manifest: Manifest) -> None:
    write_text(out_dir, MANIFEST_NAME, manifest.model_dump_json(indent=2))


def read_manifest(data_dir: str) -> Manifest:
    path = f"{data_dir}/{MANIFEST_NAME}"
    text = read_text(data_dir, MANIFEST_NAME)
    if text is None:
        raise DadpoError(f"{data_dir}: no {MANIFEST_NAME} (not a dadpo-ray dataset, or generation did not finish)")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DadpoError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise DadpoError(f"{path}: schema_version {raw.get('schema_version')}, this dadpo-ray reads {SCHEMA_VERSION}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise DadpoError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def check_tokenizer(manifest: Manifest, vocab_size: int, vocab_hash: str, where: str) -> None:
    """Refuse a dataset whose token ids were made by another tokenizer than the student's."""
    if (manifest.vocab_size, manifest.vocab_hash) != (vocab_size, vocab_hash):
        raise DadpoError(
            f"{where}: dataset tokenizer ({manifest.vocab_size} tokens, hash {manifest.vocab_hash[:12]}) differs "
            f"from the student's ({vocab_size} tokens, hash {vocab_hash[:12]})"
        )


# ---------------------------------------------------------------------------------------------------- rows
def row_problems(row: dict, k: int) -> list[str]:
    """Why a row breaks the contract (empty list = valid). Used by the writer and by training."""
    problems = []
    for side in ("chosen", "rejected"):
        ids, topk_ids, topk_lp = row[f"{side}_ids"], row[f"{side}_topk_ids"], row[f"{side}_topk_logprobs"]
        if len(ids) == 0:
            problems.append(f"empty {side} response")
        if topk_ids is None:
            if side == "chosen":
                problems.append("chosen_topk_ids missing")
            continue
        if len(topk_ids) != len(ids) or len(topk_lp) != len(ids):
            problems.append(f"{side} top-k has {len(topk_ids)} rows for {len(ids)} response tokens")
        elif any(len(r) != k for r in topk_ids) or any(len(r) != k for r in topk_lp):
            problems.append(f"{side} top-k rows are not all of length k={k}")
        elif any(not math.isfinite(x) for r in topk_lp for x in r):
            problems.append(f"{side} top-k log-probs hold NaN/inf")
    for name in LOGP_COLUMNS:
        if not math.isfinite(row[name]):
            problems.append(f"{name} is {row[name]}")
    return problems


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)


def write_shard(out_dir: str, name: str, rows: list[dict]) -> str:
    """Write one Parquet shard atomically (temp + rename): a shard either exists whole or not at all."""
    fs, root = _filesystem(out_dir)
    fs.create_dir(root, recursive=True)
    sink = pa.BufferOutputStream()
    pq.write_table(rows_to_table(rows), sink, compression="zstd")
    _write_atomically(fs, f"{root}/{name}", sink.getvalue().to_pybytes())
    return name


def list_shards(data_dir: str) -> list[str]:
    return [n for n in list_names(data_dir) if n.startswith("part-") and n.endswith(".parquet")]


def read_rows(data_dir: str, files: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
    fs, root = _filesystem(data_dir)
    names = files if files is not None else list_shards(data_dir)
    tables = []
    for name in names:
        table = pq.read_table(f"{root}/{name}", filesystem=fs, columns=columns)
        missing = set(columns or COLUMNS) - set(table.column_names)
        if missing:
            raise DadpoError(f"{data_dir}/{name}: missing columns {sorted(missing)}")
        tables.append(table)
    if not tables:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    return pa.concat_tables(tables)


def open_dataset(data_dir: str, vocab_size: int | None = None, vocab_hash: str | None = None) -> Manifest:
    """Validate a finished dataset: manifest readable, shards listed there present, tokenizer matching."""
    manifest = read_manifest(data_dir)
    if vocab_hash is not None:
        check_tokenizer(manifest, vocab_size, vocab_hash, data_dir)
    missing = set(manifest.files) - set(list_shards(data_dir))
    if missing:
        raise DadpoError(f"{data_dir}: manifest lists shards that are missing: {sorted(missing)[:3]}")
    return manifest


def write_rejects(out_dir: str, rejects: list[dict]) -> None:
    """Rows set aside with their reason ({"id", "reason", "detail"}); one JSON object per line."""
    write_text(out_dir, REJECTS_NAME, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
