"""`dadpo-ray run --schedule`: one tick of a scheduled, incremental recipe (the nightly CronJob runs it).

    <storage>/schedule/state.json   prompt ids consumed by successful runs, the last exported model, history
    <storage>/schedule/lock.json    the run in progress: host, pid, start, expiry
    <storage>/runs/<UTC time>/      one run dir per tick: prompts.jsonl (this tick's prompts) + the recipe's outputs

`<storage>` is `schedule.storage_path`, or `run_dir` when that is unset. A tick reads top to bottom:

    check the storage          missing parent, not a directory, not writable, unreachable URI: one-line DadpoError
    take the lock              held and not expired: print its holder, exit 0; expired: take it over
    select the prompts         those of `prompts` no successful run consumed (at most schedule.max_new_prompts);
                               none: print so, exit 0
    run the recipe             on <run dir>/prompts.jsonl, starting from the last exported model
                               (pruning only on the first run); the generation stage is unchanged
    record                     success: prompts and model into state.json (atomically), old run dirs deleted;
                               failure: a history entry; the next tick with the same prompts resumes that run dir
    release the lock           after success and after failure

A held lock exits 0, like "no new prompts": the tick did what it should (not run twice), and a non-zero code would
mark the scheduler's RayJob failed and page someone for the designed behaviour. A lock outliving its run (a crash)
expires after `schedule.lock_ttl_minutes` and the next tick takes it over.

Lock atomicity. Local storage: lock.json is created no-clobber (`os.link` of a fully written temp file: O_EXCL
semantics, and a reader never sees a half-written lock); taking over an expired lock and releasing one (read,
check, replace/delete) happen under `flock` on schedule/lock.mutex, which the kernel releases if the process dies,
so it never goes stale. URI storage (s3://, gs://) has no exclusive create in pyarrow: the lock is written, read
back and checked, so two ticks starting within the same moment could both proceed; there the scheduler's own
`concurrencyPolicy: Forbid` (cluster/kuberay/cronjob.yaml) is the guarantee and the lock a second line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.fs as pafs
from pydantic import BaseModel, Field

from dadpo_ray.config import RecipeConfig
from dadpo_ray.errors import DadpoError
from dadpo_ray.records import delete, list_names, read_text, write_text

SCHEDULE_DIR = "schedule"
STATE_NAME = "state.json"
LOCK_NAME = "lock.json"
MUTEX_NAME = "lock.mutex"
RUNS_DIR = "runs"
PROMPTS_NAME = "prompts.jsonl"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ------------------------------------------------------------------------------------------------- storage
def storage_of(cfg: RecipeConfig) -> str:
    """The schedule's root: schedule.storage_path or run_dir; a local path (or file:// URI) made absolute, other
    URIs as given."""
    storage = cfg.schedule.storage_path or cfg.run_dir
    storage = storage.removeprefix("file://")
    return storage if "://" in storage else os.path.abspath(os.path.expanduser(storage))


def check_storage(storage: str) -> None:
    """Refuse storage that cannot hold the schedule, before any Ray worker starts. One line, naming the fix."""
    where = f"schedule storage {storage}"
    if "://" in storage:
        try:
            fs, root = pafs.FileSystem.from_uri(storage)
            fs.get_file_info(root)
        except Exception as e:  # noqa: BLE001 - pyarrow raises per-filesystem types; the message is what matters
            raise DadpoError(f"{where}: cannot reach it (credentials, network or scheme?): {_first_line(e)}") from None
        # dadpo_ray.pipeline.run_recipe writes its stages under local paths; a URI run dir would be written to a
        # local folder named after it. Lift this once the pipeline writes URIs.
        raise DadpoError(f"{where}: scheduled runs need a local (or mounted) directory for now; the pipeline "
                         "writes run dirs on local paths only")
    path = Path(storage)
    if path.exists():
        if not path.is_dir():
            raise DadpoError(f"{where}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise DadpoError(f"{where}: not writable by this user")
        return
    if not path.parent.is_dir():
        raise DadpoError(f"{where}: parent directory {path.parent} does not exist (create it, or fix "
                         "run_dir / schedule.storage_path)")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise DadpoError(f"{where}: cannot create it, parent directory {path.parent} is not writable")


# ---------------------------------------------------------------------------------------------------- lock
class Lock(BaseModel):
    """Who runs now. `token` tells this run's lock from a later one that took it over."""

    token: str = Field(default_factory=lambda: uuid.uuid4().hex)
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    started_at: str
    expires_at: str

    @classmethod
    def new(cls, ttl_minutes: float) -> Lock:
        now = _now()
        return cls(started_at=_iso(now), expires_at=_iso(now + timedelta(minutes=ttl_minutes)))

    def expired(self) -> bool:
        return datetime.fromisoformat(self.expires_at) <= _now()

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started_at}, expires {self.expires_at}"


class LockHeld(Exception):
    def __init__(self, holder: Lock):
        super().__init__(f"another scheduled run holds the lock ({holder.describe()})")
        self.holder = holder


def _parse_lock(text: str | None) -> Lock | None:
    """The lock in a file; an unreadable one (hand-edited, truncated) counts as expired."""
    if text is None:
        return None
    try:
        return Lock.model_validate_json(text)
    except ValueError:
        return Lock(host="unknown (unreadable lock)", pid=0, started_at=_iso(_now()), expires_at=_iso(_now()))


@contextmanager
def _mutex(sched_dir: Path):
    with open(sched_dir / MUTEX_NAME, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def acquire_lock(storage: str, ttl_minutes: float) -> Lock:
    """Take the schedule's lock, or raise LockHeld naming the live holder. An expired lock is taken over."""
    mine = Lock.new(ttl_minutes)
    sched = f"{storage}/{SCHEDULE_DIR}"
    if "://" in storage:  # no exclusive create: write, read back, check (see the module docstring)
        holder = _parse_lock(read_text(sched, LOCK_NAME))
        if holder is not None and not holder.expired():
            raise LockHeld(holder)
        write_text(sched, LOCK_NAME, mine.model_dump_json())
        back = _parse_lock(read_text(sched, LOCK_NAME))
        if back is None or back.token != mine.token:
            raise LockHeld(back or holder)
        return mine
    sched_dir = Path(sched)
    sched_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = sched_dir / LOCK_NAME, sched_dir / f"{LOCK_NAME}.{mine.token}"
    tmp.write_text(mine.model_dump_json())
    try:
        with _mutex(sched_dir):
            try:
                os.link(tmp, path)  # atomic create-if-absent
                return mine
            except FileExistsError:
                pass
            holder = _parse_lock(path.read_text())
            if not holder.expired():
                raise LockHeld(holder)
            print(f"[schedule] taking over an expired lock ({holder.describe()})", flush=True)
            os.replace(tmp, path)
            return mine
    finally:
        tmp.unlink(missing_ok=True)


def release_lock(storage: str, mine: Lock) -> None:
    """Delete the lock if it is still this run's (a run that outlived its TTL may have lost it)."""
    sched = f"{storage}/{SCHEDULE_DIR}"
    if "://" in storage:
        current = _parse_lock(read_text(sched, LOCK_NAME))
        if current is not None and current.token == mine.token:
            delete(sched, [LOCK_NAME])
        return
    sched_dir = Path(sched)
    with _mutex(sched_dir):
        current = _parse_lock(read_text(sched, LOCK_NAME))
        if current is not None and current.token == mine.token:
            (sched_dir / LOCK_NAME).unlink()
        elif current is not None:
            print(f"[schedule] the lock was taken over while this run went on ({current.describe()})", flush=True)


# --------------------------------------------------------------------------------------------------- state
class ScheduleState(BaseModel):
    """What earlier ticks did. Written whole and atomically (temp + rename) by the tick holding the lock."""

    consumed: list[str] = Field(default_factory=list, description="Prompt ids of successful runs, in order.")
    last_model: str | None = Field(None, description="Model exported by the last successful run.")
    current: dict | None = Field(None, description="The tick in progress or last failed: run_dir, prompts, student.")
    history: list[dict] = Field(default_factory=list, description="One entry per finished tick, success or not.")


def read_state(storage: str) -> ScheduleState:
    text = read_text(f"{storage}/{SCHEDULE_DIR}", STATE_NAME)
    if text is None:
        return ScheduleState()
    try:
        return ScheduleState.model_validate_json(text)
    except ValueError as e:
        raise DadpoError(f"{storage}/{SCHEDULE_DIR}/{STATE_NAME}: not a schedule state ({_first_line(e)})") from None


def write_state(storage: str, state: ScheduleState) -> None:
    write_text(f"{storage}/{SCHEDULE_DIR}", STATE_NAME, state.model_dump_json(indent=2))


def prune_runs(storage: str, keep: int, protect: set[str]) -> list[str]:
    """Delete all but the newest `keep` run dirs (names sort by time), never one in `protect`; -> deleted names."""
    runs = f"{storage}/{RUNS_DIR}"
    names = list_names(runs)
    doomed = [n for n in names[: max(len(names) - keep, 0)] if f"{runs}/{n}" not in protect]
    for name in doomed:
        delete(f"{runs}/{name}")
    return doomed


# ------------------------------------------------------------------------------------------------- the tick
@dataclass
class Outcome:
    status: str  # "ran", "nothing to do" or "locked"
    message: str
    run_dir: str | None = None
    result: dict | None = None


def select_prompts(cfg: RecipeConfig, consumed: set[str]) -> tuple[list, int, int]:
    """-> (the first schedule.max_new_prompts prompts no successful run consumed, prompts in the set, rows set
    aside as invalid)."""
    from dadpo_ray.prompts import load_prompts

    prompts, rejects = load_prompts(cfg.prompts)
    fresh = [p for p in prompts if p.id not in consumed]
    return fresh[: cfg.schedule.max_new_prompts], len(prompts), len(rejects)


def tick_config(cfg: RecipeConfig, run_dir: str, prompts_file: str, start_model: str | None) -> RecipeConfig:
    """The recipe of one tick: its own run dir, its prompts file, the last model as student (no pruning then)."""
    from dadpo_ray.pipeline import with_student

    prompts = cfg.prompts.model_copy(update={
        "source": prompts_file, "limit": None, "id_column": "id", "messages_column": "messages",
        "strip_final_assistant": False})  # eval_fraction and split_seed stay: a prompt's split is fixed by its id
    run = cfg.model_copy(update={"run_dir": run_dir, "prompts": prompts}, deep=True)
    if start_model is not None:
        run = with_student(run, Path(start_model))
        run = run.model_copy(update={"prune": run.prune.model_copy(update={"enabled": False})})
    return run


def _new_run_dir(storage: str) -> str:
    stamp = _now().strftime("%Y-%m-%dT%H%M%SZ")
    taken = set(list_names(f"{storage}/{RUNS_DIR}"))
    name, n = stamp, 1
    while name in taken:
        n += 1
        name = f"{stamp}-{n}"
    return f"{storage}/{RUNS_DIR}/{name}"


def run_scheduled(cfg: RecipeConfig, compare_ddpo: bool = False) -> Outcome:
    """One tick (see the module docstring). Raises what the recipe raises, after recording the failure."""
    storage = storage_of(cfg)
    check_storage(storage)
    try:
        lock = acquire_lock(storage, cfg.schedule.lock_ttl_minutes)
    except LockHeld as held:
        return Outcome("locked", f"[schedule] skipped: {held}")
    except OSError as e:
        raise DadpoError(f"schedule storage {storage}: cannot write the lock ({_first_line(e)})") from None
    try:
        return _tick(cfg, storage, compare_ddpo)
    finally:
        release_lock(storage, lock)


def _tick(cfg: RecipeConfig, storage: str, compare_ddpo: bool) -> Outcome:
    from dadpo_ray.pipeline import run_recipe
    from dadpo_ray.ray_session import ray_session

    state = read_state(storage)
    fresh, total, invalid = select_prompts(cfg, set(state.consumed))
    if invalid:
        print(f"[schedule] {invalid} rows of {cfg.prompts.source} are not valid prompts and are never used", flush=True)
    if not fresh:
        return Outcome("nothing to do", f"[schedule] nothing to do: all {total} prompts of {cfg.prompts.source} "
                                        f"were consumed by earlier runs; add prompts to the set")
    ids = [p.id for p in fresh]
    key = {"prompts_sha": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16], "student": state.last_model}
    resume = state.current if state.current and {k: state.current.get(k) for k in key} == key else None
    if resume and Path(resume["run_dir"]).is_dir():
        run_dir = resume["run_dir"]
        print(f"[schedule] resuming the unfinished run {run_dir}", flush=True)
    else:
        run_dir = _new_run_dir(storage)
    prompts_file = f"{run_dir}/{PROMPTS_NAME}"
    write_text(run_dir, PROMPTS_NAME, "".join(json.dumps({"id": p.id, "messages": p.messages}, ensure_ascii=False)
                                              + "\n" for p in fresh))
    started = _now()
    state.current = {"run_dir": run_dir, "started_at": _iso(started), "prompts": len(ids), **key}
    write_state(storage, state)
    start = state.last_model or "the configured student (first run)"
    print(f"[schedule] {len(ids)} new prompts ({len(state.consumed)} of {total} consumed before) -> {run_dir}, "
          f"starting from {start}", flush=True)

    run_cfg = tick_config(cfg, run_dir, prompts_file, state.last_model)
    entry = {"run_dir": run_dir, "started_at": _iso(started), "prompts": len(ids), "student": state.last_model}
    try:
        with ray_session(run_cfg.ray):
            result = run_recipe(run_cfg, compare_ddpo=compare_ddpo)
    except BaseException as e:
        state.history.append({**entry, "finished_at": _iso(_now()), "status": "failed",
                              "error": f"{type(e).__name__}: {_first_line(e)}"})
        write_state(storage, state)
        raise
    state.consumed += ids
    state.last_model = f"{run_dir}/model"
    state.current = None
    state.history.append({**entry, "finished_at": _iso(_now()), "status": "succeeded", "model": state.last_model})
    write_state(storage, state)
    deleted = prune_runs(storage, cfg.schedule.keep_runs, protect={run_dir})  # run_dir holds the last model
    if deleted:
        print(f"[schedule] deleted old run dirs (schedule.keep_runs={cfg.schedule.keep_runs}): "
              f"{', '.join(deleted)}", flush=True)
    return Outcome("ran", f"[schedule] run {run_dir} consumed {len(ids)} prompts; next run starts from "
                          f"{state.last_model}", run_dir=run_dir, result=result)
