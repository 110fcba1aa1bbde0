"""judge='openai': verdicts from any OpenAI-compatible /chat/completions endpoint (hosted, or `vllm serve`).

- The API key is read from the environment variable `eval.api_key_env`; it is sent only in the Authorization
  header and scrubbed from every message, never logged or written.
- At most `eval.concurrency` requests are in flight (threads: the work is waiting on the network).
- Connection errors, timeouts, 429 and 5xx are retried `eval.max_retries` times with exponential backoff
  (`eval.backoff_s`, doubling); other 4xx (bad key, unknown model) stop at once. When a request still fails, the
  run stops with a DadpoError naming the endpoint, after the requests already in flight have finished.
- Every verdict is appended to a JSONL cache as soon as it arrives, keyed by a hash of the judge model, the
  judge's chat (prompt and both answers in their order) and the order, so a rerun never pays for it twice and a
  stopped run keeps everything it got.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from dadpo_ray.config import EvalConfig
from dadpo_ray.errors import DadpoError
from dadpo_ray.verdicts import parse_label

CACHE_NAME = "judge_cache.jsonl"


def cache_key(model: str, messages: list[dict], order: str) -> str:
    payload = json.dumps({"model": model, "messages": messages, "order": order}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class VerdictCache:
    """Append-only JSONL of {"key", "label", "raw"}; a line cut short by a killed run is ignored on reading."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.lock = threading.Lock()
        if path.exists():
            for line in path.read_text(encoding="utf-8").split("\n"):
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, entry: dict) -> None:
        with self.lock:
            self.entries[entry["key"]] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")


class _Retryable(Exception):
    pass


class EndpointJudge:
    def __init__(self, cfg: EvalConfig, cache_path: Path):
        self.cfg = cfg
        self.url = cfg.endpoint.rstrip("/") + "/chat/completions"
        self.key = os.environ.get(cfg.api_key_env) or None
        self.cache = VerdictCache(cache_path)
        self.requests_sent = 0

    def _scrub(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def _post(self, messages: list[dict]) -> str:
        """One request -> the reply's text ('' if the reply has none). Raises _Retryable or DadpoError."""
        body = json.dumps({"model": self.cfg.endpoint_model, "messages": messages, "temperature": 0.0,
                           "max_tokens": self.cfg.judge_max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self.requests_sent += 1
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                raw = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code} {e.reason}"
            if e.code == 429 or e.code >= 500:
                raise _Retryable(reason) from None
            hint = f" (is ${self.cfg.api_key_env} set?)" if e.code in (401, 403) else ""
            raise DadpoError(f"judge endpoint {self.url}: {reason}{hint}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise _Retryable(str(getattr(e, "reason", e))) from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            return raw[:500]  # not the OpenAI format: kept as the raw reply, read as unparseable

    def _ask(self, messages: list[dict], stop: threading.Event) -> str:
        for attempt in range(self.cfg.max_retries + 1):
            if stop.is_set():
                raise _Retryable("stopped: another request failed")
            try:
                return self._post(messages)
            except _Retryable as e:
                if attempt == self.cfg.max_retries:
                    raise DadpoError(f"judge endpoint {self.url}: {self._scrub(str(e))} "
                                     f"(after {self.cfg.max_retries} retries)") from None
                time.sleep(self.cfg.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def _verdict(self, key: str, messages: list[dict], stop: threading.Event) -> dict:
        try:
            raw = self._ask(messages, stop)
        except BaseException:
            stop.set()  # before this thread picks up another request
            raise
        entry = {"key": key, "label": parse_label(raw), "raw": raw}
        self.cache.put(entry)
        return entry

    def judge(self, requests: list[tuple[list[dict], str]]) -> list[dict]:
        """(judge chat, order) per request -> {"label" (None = unparseable), "raw", "cached"} in the same order."""
        keys = [cache_key(self.cfg.endpoint_model, messages, order) for messages, order in requests]
        results: list[dict | None] = [None] * len(requests)
        todo = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is not None:
                results[i] = {"label": hit["label"], "raw": hit["raw"], "cached": True}
            else:
                todo.append(i)
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = {pool.submit(self._verdict, keys[i], requests[i][0], stop): i for i in todo}
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                pool.shutdown(wait=True, cancel_futures=True)  # requests in flight finish (and are cached)
                errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
                error = next((e for e in errors if isinstance(e, DadpoError)), None)
                if error is None:
                    raise errors[0]  # a bug, not the endpoint: keep its traceback
                raise DadpoError(f"{error}; the {len(self.cache.entries)} verdicts obtained so far are kept in "
                                 f"{self.cache.path}, a rerun asks only for the rest") from None
            for future, i in futures.items():
                entry = future.result()
                results[i] = {"label": entry["label"], "raw": entry["raw"], "cached": False}
        return results
