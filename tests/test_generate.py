"""Generation stage: Ray Data actor pools -> contract Parquet, with resume, actor failure and bad rows."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest

from dadpo_ray.config import load_config
from dadpo_ray.errors import DadpoError
from dadpo_ray.generate import StudentSampler, TeacherScorer, generate
from dadpo_ray.records import open_dataset, read_manifest, read_rows, row_problems
from tests.conftest import REPO, shared_path


def tiny_cfg(run_dir, *overrides, source=None):
    base = {
        "name": "gen-test", "run_dir": str(run_dir),
        "models": {"teacher": {"path": "tiny-teacher"}, "student": {"path": "tiny-student"}},
        "prompts": {"source": str(source or shared_path("data", "prompts", "conversational_prompts.jsonl"))},
        "generate": {"max_new_tokens": 8, "topk": 4, "batch_size": 16, "rows_per_shard": 64,
                     "teacher_pool": {"num_cpus": 1}, "student_pool": {"num_cpus": 1}},
    }
    return load_config(None, list(overrides), base=base)


def all_rows(data_dir):
    return read_rows(str(data_dir), open_dataset(str(data_dir)).files).to_pylist()


def test_udfs_transform_a_hand_made_batch_without_ray(tmp_path):
    cfg = tiny_cfg(tmp_path, "generate.topk_for_rejected=true").model_dump(mode="json")
    student, teacher = StudentSampler(cfg), TeacherScorer(cfg)
    prompt = student.engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                          add_generation_prompt=True, return_dict=False)
    batch = pa.Table.from_pylist([{"id": "a", "split": "train", "prompt_messages": [{"role": "user", "content": "hi"}],
                                   "prompt_ids": prompt}])
    rows = teacher(student(batch)).to_pylist()
    assert row_problems(rows[0], k=4) == []
    assert len(rows[0]["rejected_topk_ids"]) == len(rows[0]["rejected_ids"]) > 0


def _batch(tokenizer, texts):
    rows = []
    for i, text in enumerate(texts):
        messages = [{"role": "user", "content": text}]
        rows.append({"id": f"p{i}", "split": "train", "prompt_messages": messages,
                     "prompt_ids": tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                 return_dict=False)})
    return pa.Table.from_pylist(rows)


@pytest.mark.parametrize("reference", [None, "tiny-teacher"])
def test_scores_taken_while_sampling_equal_a_separate_forward_pass(tmp_path, reference):
    """Each model scores its own samples from generate()'s raw logits; a second, left-padded forward over
    prompt + response must give the same log-probs and top-k (the alignment rule of dadpo_ray.records)."""
    overrides = ["generate.topk_for_rejected=true", "generate.max_new_tokens=12"]
    cfg = tiny_cfg(tmp_path, *overrides, *([f"models.reference.path={reference}"] if reference else []))
    student, teacher = StudentSampler(cfg.model_dump(mode="json")), TeacherScorer(cfg.model_dump(mode="json"))
    texts = ["hi", "a much longer prompt, so that the batch is left-padded", "and a third one"]
    rows = teacher(student(_batch(student.engine.tokenizer, texts))).to_pylist()
    prompts = [r["prompt_ids"] for r in rows]
    chosen, rejected = [r["chosen_ids"] for r in rows], [r["rejected_ids"] for r in rows]
    again_chosen = teacher.teacher.score(prompts, chosen, 4)
    again_ref_rejected = teacher.reference.score(prompts, rejected, None)
    for row, c, r in zip(rows, again_chosen, again_ref_rejected):
        assert row["teacher_chosen_logp"] == pytest.approx(c.logp, abs=1e-3)
        assert row["chosen_topk_ids"] == c.topk_ids
        for got, want in zip(row["chosen_topk_logprobs"], c.topk_logprobs, strict=True):
            assert got == pytest.approx(want, abs=1e-4)
        assert row["ref_rejected_logp"] == pytest.approx(r.logp, abs=1e-3)


def test_scoring_falls_back_to_a_second_pass_past_the_logits_budget(monkeypatch):
    from dadpo_ray import engines
    from dadpo_ray.config import GenerateConfig, ModelSpec

    engine = engines.HFEngine(ModelSpec(path="tiny-teacher"))
    prompts = [[1, 5, 9], [1, 7, 3, 3, 8, 2]]
    gen = GenerateConfig(max_new_tokens=10, topk=3)
    from_logits = engine.sample_and_score(prompts, gen, seed=7, k=3)
    monkeypatch.setattr(engines, "STEP_LOGITS_BUDGET_BYTES", 0)
    second_pass = engine.sample_and_score(prompts, gen, seed=7, k=3)
    assert from_logits[0] == second_pass[0]  # the same samples
    for a, b in zip(from_logits[1], second_pass[1]):
        assert a.logp == pytest.approx(b.logp, abs=1e-3) and a.topk_ids == b.topk_ids


def test_builtin_prompts_keep_earlier_turns_and_split_by_id():
    from dadpo_ray.config import PromptsConfig
    from dadpo_ray.prompts import load_prompts

    prompts, rejects = load_prompts(PromptsConfig(source="builtin:demo", eval_fraction=0.2))
    assert len(prompts) >= 200 and rejects == []
    multi = [p for p in prompts if [m["role"] for m in p.messages if m["role"] != "system"][:3]
             == ["user", "assistant", "user"]]
    assert multi, "the demo set has multi-turn chats"
    again, _ = load_prompts(PromptsConfig(source="builtin:demo", eval_fraction=0.2))
    assert [p.split for p in prompts] == [p.split for p in again]  # deterministic by id
    assert 0.1 < sum(p.split == "eval" for p in prompts) / len(prompts) < 0.3


@pytest.fixture(scope="module")
def shared_prompts_dataset(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "data"
    manifest = generate(tiny_cfg(out.parent), str(out))
    return out, manifest


def test_shared_prompt_file_passes_the_contract(shared_prompts_dataset):
    out, manifest = shared_prompts_dataset
    rows = all_rows(out)
    source = [json.loads(line) for line in shared_path("data", "prompts", "conversational_prompts.jsonl").open()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))  # every id exactly once
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").open()]
    assert len(ids) + len(rejects) == len(source) and manifest.rejected_rows == len(rejects)
    assert set(ids) | {r["id"] for r in rejects} == {str(s["id"]) for s in source}
    assert all(row_problems(r, manifest.topk) == [] for r in rows)
    assert manifest.rows["eval"] > 0 and manifest.rows["train"] + manifest.rows["eval"] == len(rows)
    result = subprocess.run([sys.executable, "-m", "dadpo_ray", "check-data", str(out)], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "0 contract violations" in result.stdout


def test_refusals_before_any_actor_starts(shared_prompts_dataset, tmp_path):
    from dadpo_ray.models import resolve_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = shared_prompts_dataset
    with pytest.raises(DadpoError, match="holds a dataset made with a different config"):
        generate(tiny_cfg(out.parent, "generate.topk=5"), str(out))
    with pytest.raises(DadpoError, match=r"generate.topk=1000 is larger than the vocabulary \(259\)"):
        generate(tiny_cfg(tmp_path, "generate.topk=1000"), str(tmp_path / "a"))
    with pytest.raises(DadpoError, match="model path /nonexistent/model: no such directory"):
        generate(tiny_cfg(tmp_path, "models.teacher.path=/nonexistent/model"), str(tmp_path / "b"))
    other = tmp_path / "other-vocab"
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny-student"))
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-student")).save_pretrained(other)
    with pytest.raises(DadpoError, match="tokenizer mismatch: teacher has 259 tokens .* student has 260"):
        generate(tiny_cfg(tmp_path, f"models.student.path={other}"), str(tmp_path / "c"))
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing written


def test_bad_rows_are_set_aside_and_counted(ray_cluster, tmp_path):
    good = [{"id": f"g{i}", "messages": [{"role": "user", "content": f"Question number {i}?"}]} for i in range(5)]
    bad = [
        {"id": "long", "prompt": "x" * 400},
        {"id": "empty", "messages": [{"role": "user", "content": "   "}]},
        {"id": "role", "messages": [{"role": "wizard", "content": "hello"}]},
        {"id": "surrogate", "prompt": "broken \ud800 text"},
        {"id": "g1", "prompt": "a duplicate id"},
        {"id": "last", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in good + bad) + "{not json\n")
    out = tmp_path / "data"  # written through a URI, as an s3:// output would be
    manifest = generate(tiny_cfg(tmp_path, "generate.max_prompt_tokens=300", source=source), f"file://{out}")
    assert sorted(r["id"] for r in all_rows(out)) == [f"g{i}" for i in range(5)]
    assert manifest.rejected_rows == 7
    assert manifest.rejected_reasons == {"prompt too long": 1, "empty text": 1, "bad role": 1, "undecodable text": 1,
                                         "duplicate id": 1, "bad roles": 1, "not valid JSON": 1}
    reasons = {r["id"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").open())}
    assert reasons["long"] == "prompt too long" and reasons["row 12"] == "not valid JSON"


def _run_cli(config_path, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "dadpo_ray", "generate", "--config", str(config_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_killed_driver_resumes_with_the_remaining_prompts(ray_cluster, tmp_path):
    import yaml

    cfg = tiny_cfg(tmp_path / "run", "prompts.limit=160", "generate.rows_per_shard=8", "generate.batch_size=8")
    config_path = tmp_path / "gen.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    data = tmp_path / "run" / "data"
    first = _run_cli(config_path, env, start_new_session=True)
    deadline = time.time() + 300
    while not list(data.glob("part-*.parquet")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and anything it spawned
    first.wait()
    assert list(data.glob("part-*.parquet")) and not (data / "manifest.json").exists()
    landed = len(read_rows(str(data), columns=["id"]))
    second = _run_cli(config_path, env)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output
    resumed = int(output.split(" already on disk")[0].rsplit(", ", 1)[1])
    assert resumed >= landed > 0  # the rerun skipped what the first run wrote
    ids = [r["id"] for r in all_rows(data)]
    manifest = read_manifest(str(data))
    assert len(ids) == len(set(ids)) == 160 - manifest.rejected_rows


def _alive_actor(udf_name):
    """The live actor of this cluster running the UDF (Ray names it MapWorker(MapBatches(<udf>))), or None."""
    from ray._private import state

    for actor in state.actors().values():
        if actor["State"] == "ALIVE" and actor["Pid"] and udf_name in actor["ActorClassName"]:
            return actor
    return None


def test_killed_actor_is_restarted_without_losing_rows(ray_cluster, tmp_path):
    from ray._private import state

    # 160 prompts at 8 a batch: the teacher has many batches to go when it is killed.
    cfg = tiny_cfg(tmp_path, "prompts.limit=160", "generate.rows_per_shard=8", "generate.batch_size=8",
                   "generate.max_new_tokens=48")
    out = tmp_path / "data"
    result = {}
    worker = threading.Thread(target=lambda: result.update(manifest=generate(cfg, str(out))))
    worker.start()
    killed, first_seen, was_mid_run = None, None, False
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and worker.is_alive():
        actor = _alive_actor("TeacherScorer")
        if actor and first_seen is None:
            first_seen = time.time()
        # Kill it once it is into its batches: a shard has landed, or it has been up for a second.
        if actor and (list(out.glob("part-*.parquet")) or time.time() - first_seen > 1.0):
            try:
                os.kill(actor["Pid"], signal.SIGKILL)
                killed, was_mid_run = actor, worker.is_alive()
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    worker.join(timeout=600)
    assert killed is not None and was_mid_run, "the teacher actor was not caught alive mid-run"
    assert state.actors(killed["ActorID"])["NumRestarts"] >= 1  # Ray restarted it rather than giving up
    manifest = result["manifest"]
    ids = [r["id"] for r in all_rows(out)]
    assert len(ids) == len(set(ids)) == 160 - manifest.rejected_rows
