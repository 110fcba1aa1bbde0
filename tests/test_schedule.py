"""Scheduled runs (`dadpo-ray run --schedule`, dadpo_ray/schedule.py): the lock, the storage refusals, keep-last-N,
failure bookkeeping, and two real incremental ticks of the quick recipe on a local Ray cluster."""

import json
import os
from pathlib import Path

import pytest
import yaml

from dadpo_ray.cli import main
from dadpo_ray.config import load_config
from dadpo_ray.errors import DadpoError
from dadpo_ray.records import read_manifest
from dadpo_ray.schedule import (LOCK_NAME, SCHEDULE_DIR, Lock, LockHeld, acquire_lock, prune_runs, read_state,
                                release_lock, run_scheduled, select_prompts, tick_config)
from tests.conftest import REPO

QUICK = REPO / "dadpo_ray" / "configs" / "demo_quick.yaml"
# The quick recipe, smaller still: 24 prompts hold 3 eval prompts, prompts 25-36 hold 7 (split by id hash).
SMALL = ["generate.max_new_tokens=8", "eval.max_new_tokens=8", "eval.judge=none", "eval.bootstrap=50",
         "train.epochs=1"]


def _quick(storage: Path, *overrides: str):
    return load_config(QUICK, [f"run_dir={storage}", *SMALL, *overrides])


# ---------------------------------------------------------------------------------------------------- lock
@pytest.mark.parametrize("scheme", ["", "file://"], ids=["local", "uri"])
def test_held_lock_refuses_a_second_taker_until_released(tmp_path, scheme):
    storage = f"{scheme}{tmp_path}"
    mine = acquire_lock(storage, ttl_minutes=60)
    with pytest.raises(LockHeld) as held:
        acquire_lock(storage, ttl_minutes=60)
    assert held.value.holder.token == mine.token and held.value.holder.pid == os.getpid()
    release_lock(storage, mine)
    assert not (tmp_path / SCHEDULE_DIR / LOCK_NAME).exists()
    release_lock(storage, acquire_lock(storage, ttl_minutes=60))


@pytest.mark.parametrize("scheme", ["", "file://"], ids=["local", "uri"])
def test_expired_lock_of_a_crashed_run_is_taken_over(tmp_path, scheme):
    crashed = Lock(host="node-7", pid=4242, started_at="2026-12-01T03:00:00+00:00",
                   expires_at="2026-12-02T01:00:00+00:00")
    (tmp_path / SCHEDULE_DIR).mkdir()
    (tmp_path / SCHEDULE_DIR / LOCK_NAME).write_text(crashed.model_dump_json())
    mine = acquire_lock(f"{scheme}{tmp_path}", ttl_minutes=60)
    on_disk = Lock.model_validate_json((tmp_path / SCHEDULE_DIR / LOCK_NAME).read_text())
    assert on_disk.token == mine.token != crashed.token


def test_unreadable_lock_counts_as_expired(tmp_path):
    (tmp_path / SCHEDULE_DIR).mkdir()
    (tmp_path / SCHEDULE_DIR / LOCK_NAME).write_text('{"host": "half-writ')
    release_lock(str(tmp_path), acquire_lock(str(tmp_path), ttl_minutes=60))


def test_release_keeps_a_lock_that_another_run_took_over(tmp_path):
    first = acquire_lock(str(tmp_path), ttl_minutes=60)
    lock_file = tmp_path / SCHEDULE_DIR / LOCK_NAME
    lock_file.write_text(first.model_copy(update={"expires_at": "2000-01-01T00:00:00+00:00"}).model_dump_json())
    second = acquire_lock(str(tmp_path), ttl_minutes=60)  # first outlived its TTL
    release_lock(str(tmp_path), first)
    assert Lock.model_validate_json(lock_file.read_text()).token == second.token


def test_scheduled_run_while_locked_exits_0_naming_the_holder(tmp_path, capsys):
    holder = acquire_lock(str(tmp_path), ttl_minutes=60)
    rc = main(["run", "--config", str(QUICK), "--schedule", f"run_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "holds the lock" in out and f"pid {holder.pid}" in out and holder.host in out
    assert holder.started_at in out and holder.expires_at in out
    assert not (tmp_path / "runs").exists()
    release_lock(str(tmp_path), holder)


# ------------------------------------------------------------------------------------------------- storage
def test_storage_refusals_are_one_line_and_come_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {
        f"run_dir={tmp_path}/missing/store": "parent directory",
        f"run_dir={a_file}": "is not a directory",
        "run_dir=nosuchfs://bucket/dadpo": "cannot reach it",
        f"schedule.storage_path={a_file}/store": "parent directory",
    }
    for override, reason in cases.items():
        rc = main(["run", "--config", str(QUICK), "--schedule", override])
        err = capsys.readouterr().err
        assert rc == 2, override
        assert err.startswith("dadpo-ray: error: schedule storage ") and reason in err, err
        assert err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_storage_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(DadpoError, match="not writable"):
        run_scheduled(_quick(tmp_path / "ro" / "store"))


# -------------------------------------------------------------------------------------------- keep last N
def test_keep_last_n_never_deletes_the_run_holding_the_last_model(tmp_path):
    names = ["2026-12-01T030000Z", "2026-12-02T030000Z", "2026-12-03T030000Z", "2026-12-04T030000Z",
             "2026-12-04T030000Z-2"]
    for name in names:
        (tmp_path / "runs" / name / "model").mkdir(parents=True)
    protected = f"{tmp_path}/runs/{names[1]}"
    deleted = prune_runs(str(tmp_path), keep=2, protect={protected})
    assert deleted == [names[0], names[2]]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [names[1], names[3], names[4]]
    assert prune_runs(str(tmp_path), keep=5, protect=set()) == []


# ------------------------------------------------------------------------------------------------ selection
def test_selection_skips_consumed_prompts_and_caps_each_run(tmp_path):
    _prompt_file(tmp_path / "prompts.jsonl", 10)
    cfg = _quick(tmp_path, f"prompts.source={tmp_path}/prompts.jsonl", "prompts.limit=null")
    fresh, total, invalid = select_prompts(cfg, consumed={"p1", "p3"})
    assert [p.id for p in fresh] == ["p0", "p2", "p4", "p5", "p6", "p7", "p8", "p9"] and (total, invalid) == (10, 0)
    cfg.schedule.max_new_prompts = 3
    assert [p.id for p in select_prompts(cfg, consumed={"p1", "p3"})[0]] == ["p0", "p2", "p4"]


def test_tick_config_continues_from_the_last_model_without_pruning(tmp_path):
    cfg = _quick(tmp_path, "prompts.limit=24", "prompts.eval_fraction=0.3")
    first = tick_config(cfg, f"{tmp_path}/runs/a", f"{tmp_path}/runs/a/prompts.jsonl", start_model=None)
    assert first.prune.enabled and first.models.student.path == cfg.models.student.path
    assert (first.prompts.source, first.prompts.limit, first.prompts.eval_fraction) == \
        (f"{tmp_path}/runs/a/prompts.jsonl", None, 0.3)
    later = tick_config(cfg, f"{tmp_path}/runs/b", f"{tmp_path}/runs/b/prompts.jsonl", f"{tmp_path}/runs/a/model")
    assert not later.prune.enabled and later.models.student.path == f"{tmp_path}/runs/a/model"
    assert later.run_dir == f"{tmp_path}/runs/b" and later.models.reference is None  # reference = that student


# ---------------------------------------------------------------------------------- real ticks on Ray
def _prompt_file(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Name a colour, number {i}."}) + "\n"
                            for i in range(n)))


@pytest.mark.ray
def test_failed_run_releases_the_lock_records_the_failure_and_is_resumed(tmp_path, ray_cluster):
    _prompt_file(tmp_path / "prompts.jsonl", 8)
    cfg = _quick(tmp_path / "store", f"prompts.source={tmp_path}/prompts.jsonl", "prompts.limit=null",
                 f"models.student.path={tmp_path}/no-such-model")
    for _ in range(2):
        with pytest.raises(DadpoError, match="no-such-model"):
            run_scheduled(cfg)
    store = tmp_path / "store"
    assert not (store / SCHEDULE_DIR / LOCK_NAME).exists()
    state = read_state(str(store))
    assert state.consumed == [] and state.last_model is None
    first, second = state.history
    assert first["status"] == second["status"] == "failed" and "no-such-model" in first["error"]
    assert second["run_dir"] == first["run_dir"] == state.current["run_dir"]  # the same prompts resume that dir
    assert len(list((store / "runs").iterdir())) == 1


def _ids(prompts_file: Path) -> set[str]:
    return {json.loads(line)["id"] for line in prompts_file.read_text().splitlines()}


@pytest.mark.ray
@pytest.mark.slow
def test_two_ticks_train_incrementally_on_new_prompts_only(tmp_path, ray_cluster):
    store = tmp_path / "store"
    first = run_scheduled(_quick(store, "prompts.limit=24", "schedule.keep_runs=1"))
    assert first.status == "ran"
    run1 = Path(first.run_dir)
    assert (run1 / "model").is_dir() and (run1 / "eval" / "results.json").is_file()
    cfg1 = yaml.safe_load((run1 / "config.yaml").read_text())
    assert cfg1["prune"]["enabled"] and cfg1["prompts"]["source"] == f"{run1}/prompts.jsonl"
    ids1 = _ids(run1 / "prompts.jsonl")
    assert len(ids1) == 24

    second = run_scheduled(_quick(store, "prompts.limit=36", "schedule.keep_runs=1"))
    assert second.status == "ran"
    run2 = Path(second.run_dir)
    cfg2 = yaml.safe_load((run2 / "config.yaml").read_text())
    assert cfg2["models"]["student"]["path"] == f"{run1}/model" and not cfg2["prune"]["enabled"]
    manifest = read_manifest(str(run2 / "data"))
    assert sum(manifest.rows.values()) + manifest.rejected_rows == 12  # prompts 25-36 only
    ids2 = _ids(run2 / "prompts.jsonl")
    assert len(ids2) == 12 and not ids1 & ids2
    state = read_state(str(store))
    assert len(state.consumed) == len(set(state.consumed)) == 36
    assert state.last_model == f"{run2}/model" and state.current is None
    assert [h["status"] for h in state.history] == ["succeeded", "succeeded"]
    assert sorted(p.name for p in (store / "runs").iterdir()) == [run2.name]  # keep_runs=1 deleted run 1
    assert not (store / SCHEDULE_DIR / LOCK_NAME).exists()

    third = run_scheduled(_quick(store, "prompts.limit=36"))
    assert third.status == "nothing to do" and "all 36 prompts" in third.message
    assert sorted(p.name for p in (store / "runs").iterdir()) == [run2.name]
