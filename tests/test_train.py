"""Integration tests of the training stage: a real local Ray cluster, real DeepSpeed (gloo on CPU), 2 workers,
tiny models, fp32. Every run uses the same 16-pair dataset; a global batch of 4 pairs gives 4 steps per epoch."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dadpo_ray.config import load_config
from dadpo_ray.errors import DadpoError
from dadpo_ray.models import load_tokenizer, resolve_model_path
from dadpo_ray.records import read_manifest, read_rows
from dadpo_ray.sampler import epoch_order
from dadpo_ray.scoring import score_responses
from dadpo_ray.train import select_rows, train
from tests.pair_data import STUDENT, generate_rows, write_dataset

pytestmark = pytest.mark.usefixtures("ray_cluster")

BASE = {"models": {"teacher": {"path": "tiny-teacher"}, "student": {"path": "tiny-student"}},
        "prompts": {"source": "builtin:demo"}}
# 3 epochs x 4 steps at a high lr: enough for the reward accuracy to move; a checkpoint every 2 steps.
RUN = ["train.num_workers=2", "train.micro_batch_size=2", "train.grad_accum=1", "train.epochs=3", "train.lr=1e-3",
       "train.zero_stage=2", "train.checkpoint_every=2", "train.keep_checkpoints=2"]


def config(name, *overrides):
    return load_config(None, [f"name={name}", *RUN, *overrides], base=BASE)


@pytest.fixture(scope="session")
def rows():
    return generate_rows(16)


@pytest.fixture(scope="session")
def data_dir(rows, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    write_dataset(out, rows)
    return out


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """The uninterrupted run every reliability test compares with."""
    out = tmp_path_factory.mktemp("reference")
    result = train(config("reference"), data_dir, str(out))
    return result


def weights(model_dir):
    return load_file(str(Path(model_dir) / "model.safetensors"))


def metric_lines(result):
    return [json.loads(line) for line in Path(result["metrics_file"]).read_text().splitlines()]


def assert_each_sample_once_per_epoch(lines, num_rows=16, epochs=3):
    """The log's [epoch_start, epoch_end) intervals tile every epoch exactly once: no row twice, none skipped."""
    assert [m["step"] for m in lines] == list(range(1, len(lines) + 1))
    for epoch in range(epochs):
        spans = sorted((m["epoch_start"], m["epoch_end"]) for m in lines if m["epoch"] == epoch)
        trained = [i for start, end in spans for i in epoch_order(num_rows, 0, epoch)[start:end]]
        assert sorted(trained) == list(range(num_rows)), f"epoch {epoch}: {spans}"
    assert lines[-1]["samples_seen"] == num_rows * epochs


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0, msg=name)


def kill_a_worker_when(metrics_file, min_step, timeout=600):
    """Wait until the run logged `min_step`, then SIGKILL one Ray Train worker of this test's cluster.

    Workers are descendants of this process (it started the local Ray), found by their process title.
    Returns the last step logged before the kill."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = Path(metrics_file).read_text().splitlines() if Path(metrics_file).exists() else []
        if lines and json.loads(lines[-1])["step"] >= min_step:
            for proc in psutil.Process(os.getpid()).children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(proc.cmdline()):
                        os.kill(proc.pid, signal.SIGKILL)
                        return json.loads(lines[-1])["step"]
                except psutil.NoSuchProcess:
                    continue
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {min_step}")


def reward_accuracy(model_dir, rows):
    """Implicit reward accuracy of a model on the training pairs: (lp_c - ref_c) > (lp_r - ref_r)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pad = load_tokenizer(STUDENT).pad_token_id
    prompts = [r["prompt_ids"] for r in rows]
    chosen = score_responses(model, prompts, [r["chosen_ids"] for r in rows], None, pad)
    rejected = score_responses(model, prompts, [r["rejected_ids"] for r in rows], None, pad)
    wins = [(c.logp - r["ref_chosen_logp"]) > (j.logp - r["ref_rejected_logp"])
            for c, j, r in zip(chosen, rejected, rows)]
    return sum(wins) / len(wins)


# ------------------------------------------------------------------------------------------------ runs
def test_zero2_exports_a_trained_loadable_model(reference_run, rows):
    from transformers import AutoModelForCausalLM

    model_dir = reference_run["model_dir"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # a plain HF model dir
    assert model.generation_config.eos_token_id is not None
    before = load_file(str(Path(resolve_model_path(STUDENT)) / "model.safetensors"))
    after = weights(model_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    card = (Path(model_dir) / "README.md").read_text()
    assert "tiny-teacher" in card and '"beta2": 0.05' in card and "config fingerprint `tests`" in card
    assert reward_accuracy(resolve_model_path(STUDENT), rows) == 0.0  # ties at the start: reward 0 vs 0
    assert reward_accuracy(model_dir, rows) > 0.5
    lines = metric_lines(reference_run)
    assert_each_sample_once_per_epoch(lines)
    assert {"loss", "pref", "margin", "reward_acc", "chosen_reward", "rejected_reward", "token_kl", "grad_norm",
            "lr", "tokens_per_s", "samples_seen"} <= lines[-1].keys()
    checkpoints = sorted(p.name for p in Path(reference_run["run_dir"]).glob("checkpoint_0*"))
    assert checkpoints == ["checkpoint_0000010", "checkpoint_0000012"]  # keep_checkpoints=2


def test_zero3_finishes_and_exports(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(config("zero3", "train.zero_stage=3", "train.epochs=1", "train.loss.preset=dadpo_tok"),
                   data_dir, str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(result["model_dir"])
    before = load_file(str(Path(resolve_model_path(STUDENT)) / "model.safetensors"))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert metric_lines(result)[-1]["tok"] is not None  # the token KL was trained on


def in_thread(fn):
    """Run fn in a thread; returns (thread, outcome) where outcome gets "result" or "error"."""
    outcome = {}

    def target():
        try:
            outcome["result"] = fn()
        except Exception as e:  # e.g. Ray Train's TrainingFailedError
            outcome["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_dsft_preset_trains_on_the_teacher_answers_only(data_dir, tmp_path):
    result = train(config("dsft", "train.loss.preset=dsft", "train.num_workers=1", "train.max_steps=2"),
                   data_dir, str(tmp_path))
    lines = metric_lines(result)
    assert len(lines) == 2 and lines[-1]["sft"] > 0 and lines[-1]["pref"] is None  # no rejected side


def test_worker_killed_mid_run_resumes_to_the_same_weights(reference_run, data_dir, tmp_path):
    run, outcome = in_thread(lambda: train(config("killed"), data_dir, str(tmp_path)))
    killed_at = kill_a_worker_when(tmp_path / "train" / "killed" / "metrics.jsonl", min_step=5)
    run.join()
    assert killed_at < 12, "the run finished before the worker was killed"
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    lines = metric_lines(result)
    assert max(m["resumed_from"] for m in lines) > 0  # restarted from a checkpoint, not from scratch
    assert_each_sample_once_per_epoch(lines)
    assert_same_weights(result["model_dir"], reference_run["model_dir"])


def test_stop_and_rerun_continues_from_the_last_checkpoint(reference_run, data_dir, tmp_path):
    cfg = config("stopped", "train.max_failures=0")  # a failure stops the run
    run, outcome = in_thread(lambda: train(cfg, data_dir, str(tmp_path)))
    kill_a_worker_when(tmp_path / "train" / "stopped" / "metrics.jsonl", min_step=5)
    run.join()
    assert "error" in outcome, "the run should have stopped"
    result = train(cfg, data_dir, str(tmp_path))  # the same command again
    lines = metric_lines(result)
    assert max(m["resumed_from"] for m in lines) > 0
    assert_each_sample_once_per_epoch(lines)
    assert_same_weights(result["model_dir"], reference_run["model_dir"])


def test_resume_on_fewer_workers_keeps_the_data_position(data_dir, tmp_path):
    # 3 steps on 2 workers (12 of epoch 0's 16 rows), then the rest on 1 worker (global batch 4 -> 2).
    train(config("shrink", "train.max_steps=3", "train.epochs=2"), data_dir, str(tmp_path))
    result = train(config("shrink", "train.num_workers=1", "train.epochs=2"), data_dir, str(tmp_path))
    lines = metric_lines(result)
    assert [m["world_size"] for m in lines] == [2] * 3 + [1] * 10  # 2 steps finish epoch 0, 8 make epoch 1
    assert lines[3]["epoch_start"] == 12 and lines[3]["resumed_from"] == 3
    assert_each_sample_once_per_epoch(lines, epochs=2)


# --------------------------------------------------------------------------------------------- refusals
def test_refuses_missing_manifest(tmp_path):
    with pytest.raises(DadpoError, match="no manifest.json"):
        train(config("x"), str(tmp_path), str(tmp_path / "out"))


def test_refuses_dataset_of_another_tokenizer(rows, tmp_path):
    write_dataset(str(tmp_path), rows, vocab={"vocab_size": 259, "vocab_hash": "0" * 64})
    with pytest.raises(DadpoError, match="dataset tokenizer .* differs from the student's"):
        train(config("x"), str(tmp_path), str(tmp_path / "out"))


def test_refuses_topk_length_mismatch_naming_the_row(rows, tmp_path):
    bad = [dict(r) for r in rows]
    bad[3]["chosen_topk_ids"] = bad[3]["chosen_topk_ids"][:-1]
    write_dataset(str(tmp_path), bad)
    with pytest.raises(DadpoError, match="1 bad row.*row003 .*top-k has 7 rows for 8 response tokens"):
        train(config("x"), str(tmp_path), str(tmp_path / "out"))


def test_nan_logprobs_are_refused_or_skipped_and_counted(rows, tmp_path):
    bad = [dict(r) for r in rows]
    bad[2]["ref_chosen_logp"] = float("nan")
    bad[5]["teacher_rejected_logp"] = float("inf")
    write_dataset(str(tmp_path), bad)
    with pytest.raises(DadpoError, match=r"2 bad row\(s\) \(train.skip_bad_rows=true.*row002 .*row005"):
        train(config("x"), str(tmp_path), str(tmp_path / "out"))
    manifest = read_manifest(str(tmp_path))
    keep, counts = select_rows(str(tmp_path), manifest, config("x", "train.skip_bad_rows=true").train)
    assert counts["bad_rows_skipped"] == 2 and len(keep) == 14
    kept_ids = read_rows(str(tmp_path), manifest.files, columns=["id"]).column("id").to_pylist()
    assert {kept_ids[i] for i in keep}.isdisjoint({"row002", "row005"})


def test_refuses_fp16_on_cpu(data_dir, tmp_path):
    with pytest.raises(DadpoError, match="train.precision: fp16 needs a GPU"):
        train(config("x", "train.precision=fp16"), data_dir, str(tmp_path))
