"""Read a prompt set, normalise each row to {id, messages}, set bad rows aside, split train/eval by id.

Accepted sources: a .jsonl or .parquet file, `builtin:demo` (the demo prompts shipped in the package), or a
Hugging Face datasets name. A row gives its chat as a `messages` list ({role, content}), a `turns` list of user
strings, or a plain `prompt` string. Bad rows never stop the job: each is returned as a reject with its reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dadpo_ray.config import PromptsConfig
from dadpo_ray.errors import DadpoError

BUILTIN_DEMO = Path(__file__).parent / "data" / "demo_prompts.jsonl"
ROLES = {"system", "user", "assistant"}


@dataclass
class Prompt:
    id: str
    messages: list[dict]
    split: str = "train"


def read_source(cfg: PromptsConfig) -> list[dict]:
    source = cfg.source
    if source == "builtin:demo":
        source = str(BUILTIN_DEMO)
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        if not path.exists():
            raise DadpoError(f"prompts.source {source}: no such file")
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append({"__error__": f"line {n}: not valid JSON ({e.msg})", "__line__": n})
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        if not path.exists():
            raise DadpoError(f"prompts.source {source}: no such file")
        return pq.read_table(path).to_pylist()
    if path.exists() or source.startswith((".", "/", "~")):
        raise DadpoError(f"prompts.source {source}: expected a .jsonl or .parquet file")
    import datasets  # a hub dataset name: the one path that may download (never in tests or the demo)

    try:
        return list(datasets.load_dataset(source, split=cfg.hf_split))
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise DadpoError(f"prompts.source {source}: cannot load dataset ({str(e).splitlines()[0]})") from None


def _messages(row: dict, cfg: PromptsConfig) -> list[dict]:
    """The row's chat, or raise ValueError(reason, detail): a short reason (counted) and the particulars."""
    if "__error__" in row:
        raise ValueError("not valid JSON", row["__error__"])
    if row.get(cfg.messages_column) is not None:
        messages = row[cfg.messages_column]
    elif row.get(cfg.turns_column) is not None:
        turns = row[cfg.turns_column]
        if not isinstance(turns, list) or len(turns) % 2 == 0:
            raise ValueError("bad turns", f"{cfg.turns_column} must be a list of an odd number of turns (user last)")
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    elif row.get(cfg.prompt_column) is not None:
        messages = [{"role": "user", "content": row[cfg.prompt_column]}]
    else:
        raise ValueError("no prompt", f"no {cfg.messages_column}, {cfg.turns_column} or {cfg.prompt_column} column")
    if not isinstance(messages, list) or not messages:
        raise ValueError("empty text", "empty conversation")
    if cfg.strip_final_assistant and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError("bad role", f"message {m!r:.60}")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError("empty text", f"empty {m['role']} message")
        if "\ufffd" in content or any(0xD800 <= ord(c) <= 0xDFFF for c in content):
            raise ValueError("undecodable text", "replacement or surrogate characters")
        clean.append({"role": m["role"], "content": content})
    if clean[-1]["role"] != "user":
        raise ValueError("bad roles", "the last message is not a user turn")
    return clean


def stable_id(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def split_of(row_id: str, eval_fraction: float, seed: int) -> str:
    """Deterministic by id alone, so a prompt's split never changes between runs or machines."""
    h = int(hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if h < eval_fraction else "train"


def load_prompts(cfg: PromptsConfig) -> tuple[list[Prompt], list[dict]]:
    """-> (valid prompts with their split, rejects [{id, reason, detail}]); later duplicates of an id are rejected."""
    prompts, rejects, seen = [], [], set()
    rows = read_source(cfg)
    if cfg.limit:
        rows = rows[: cfg.limit]
    for n, row in enumerate(rows, 1):
        raw_id = row.get(cfg.id_column) if isinstance(row, dict) else None
        try:
            messages = _messages(row, cfg)
        except ValueError as e:
            reason, detail = e.args
            rejects.append({"id": str(raw_id) if raw_id is not None else f"row {n}", "reason": reason,
                            "detail": detail})
            continue
        row_id = str(raw_id) if raw_id is not None else stable_id(messages)
        if row_id in seen:
            rejects.append({"id": row_id, "reason": "duplicate id", "detail": f"row {n}"})
            continue
        seen.add(row_id)
        prompts.append(Prompt(row_id, messages, split_of(row_id, cfg.eval_fraction, cfg.split_seed)))
    return prompts, rejects
