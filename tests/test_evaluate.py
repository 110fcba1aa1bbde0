"""Evaluation and report: verdict logic (no Ray), the endpoint judge against a real local HTTP server, and
end-to-end runs on a real local Ray cluster with the tiny models."""

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from dadpo_ray.config import EvalConfig, ModelSpec, load_config
from dadpo_ray.endpoint_judge import CACHE_NAME, EndpointJudge
from dadpo_ray.errors import DadpoError
from dadpo_ray.evaluate import ANSWERS_NAME, RESULTS_NAME, evaluate, held_out_rows
from dadpo_ray.generate import generate
from dadpo_ray.records import open_dataset, read_manifest, read_rows, write_manifest, write_shard
from dadpo_ray.report import format_table, write_report
from dadpo_ray.verdicts import (
    CANDIDATE_FIRST, TEACHER_FIRST, combine_logprobs, combine_orders, judge_messages, label_from_logprobs, parse_label,
    summarize,
)
from tests.conftest import shared_path


# ------------------------------------------------------------------------------------ verdicts (no Ray)
def test_both_orders_cancel_position_bias_on_hand_made_label_logprobs():
    """Label log-probs (A, B, C) per order -> labels -> the candidate's outcome.

    A judge that always says "A" picks the teacher when the teacher is first and the candidate when the candidate
    is first: +1 - 1 = 0, a tie. A judge that picks the candidate in both orders gives a win; one order a tie and
    the other a loss gives a loss."""
    says_a, says_b, says_tie = [-0.1, -3.0, -4.0], [-3.0, -0.1, -4.0], [-2.0, -2.5, -0.2]
    label = lambda lp: label_from_logprobs(lp, tie_margin=0.1)
    assert (label(says_a), label(says_b), label(says_tie)) == ("A", "B", "C")
    assert combine_orders(label(says_a), label(says_a)) == 0  # position bias only: cancelled
    assert combine_orders(label(says_b), label(says_a)) == 1  # candidate second, then first: preferred both times
    assert combine_orders(label(says_a), label(says_b)) == -1  # teacher preferred both times
    assert combine_orders(label(says_tie), label(says_b)) == -1  # tie, then the teacher (second) wins
    assert combine_orders(label(says_b), label(says_tie)) == 1
    # Tie margin: A ahead of B by 0.05 nats is a tie at margin 0.1, a verdict for A at margin 0.01.
    close = [-1.0, -1.05, -5.0]
    assert label_from_logprobs(close, 0.1) == "C" and label_from_logprobs(close, 0.01) == "A"
    # Not finite: unparseable (None), which counts as a tie.
    assert label_from_logprobs([float("nan"), -1.0, -2.0], 0.1) is None
    assert combine_orders(None, label(says_b)) == -1 and combine_orders(None, None) == 0


def test_llm_judge_log_odds_cancel_a_constant_position_bias():
    """d = (lp_B - lp_A)[teacher first] + (lp_A - lp_B)[candidate first].

    A judge with a +1.0 nat bias toward "B" that likes the candidate by 0.3 nats: teacher first it sees
    (A = teacher, B = candidate): lp_B - lp_A = 1.0 + 0.3; candidate first: lp_A - lp_B = 0.3 - 1.0.
    d = 1.3 - 0.7 = 0.6 > 0: a win, although "B" is its label in both orders (labels alone would say tie)."""
    teacher_first, candidate_first = [-2.0, -0.7, -3.0], [-1.7, -1.0, -3.0]
    assert label_from_logprobs(teacher_first, 0.1) == label_from_logprobs(candidate_first, 0.1) == "B"
    assert combine_orders("B", "B") == 0
    assert combine_logprobs(teacher_first, candidate_first, tie_margin=0.1) == 1
    assert combine_logprobs(candidate_first, teacher_first, tie_margin=0.1) == -1  # mirror image: the teacher's
    assert combine_logprobs(teacher_first, candidate_first, tie_margin=0.7) == 0  # |d| = 0.6 within the margin
    # The tie label likeliest in both orders: a tie, unless tie_label=False leaves it to the log-odds.
    tie_tf, tie_cf = [-2.0, -1.5, -0.5], [-1.8, -1.7, -0.5]  # d = 0.5 + (-0.1) = 0.4
    assert combine_logprobs(tie_tf, tie_cf, 0.1) == 0 and combine_logprobs(tie_tf, tie_cf, 0.1, tie_label=False) == 1
    assert combine_logprobs([float("nan")] * 3, candidate_first, 0.1) == 0  # unparseable: a tie


def test_judge_replies_are_parsed_or_declared_unparseable():
    assert parse_label("Verdict: B") == "B" and parse_label("verdict - a.") == "A"
    assert parse_label("**C**") == "C" and parse_label(" tie ") == "C" and parse_label("A") == "A"
    assert parse_label("Both answers are fine, hard to say.") is None
    assert parse_label("Verdict: A. On reflection, Verdict: B") is None  # contradicts itself
    assert parse_label("") is None and parse_label(None) is None


def test_bootstrap_intervals_contain_the_point_estimate_and_stay_in_range():
    rng = np.random.default_rng(7)
    for probs in ([0.3, 0.3, 0.4], [0.7, 0.2, 0.1], [0.0, 0.0, 1.0]):
        outcomes = rng.choice([1, 0, -1], size=40, p=probs).tolist()
        s = summarize(outcomes, resamples=500, seed=0)
        assert s["wins"] + s["ties"] + s["losses"] == s["n"] == 40
        assert s["preference_rate"] == pytest.approx(s["win_rate"] - s["loss_rate"])
        for point, (low, high) in ((s["win_rate"], s["win_rate_ci"]), (s["preference_rate"], s["preference_rate_ci"])):
            assert -1.0 <= low <= point <= high <= 1.0
        assert summarize(outcomes, resamples=500, seed=0) == s  # seeded
    wide = summarize([1, -1] * 5, 500, 0)["preference_rate_ci"]
    narrow = summarize([1, -1] * 200, 500, 0)["preference_rate_ci"]
    assert wide[1] - wide[0] > narrow[1] - narrow[0] > 0  # more prompts, tighter interval


# --------------------------------------------------------------------------- a real OpenAI-format server
class JudgeServer:
    """A local HTTP server speaking /v1/chat/completions. `reply(request_body, attempt)` returns
    (status, content); attempt counts the requests seen for the same body."""

    def __init__(self, reply):
        self.reply, self.requests, self.seen, self.headers = reply, 0, {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps(body["messages"], sort_keys=True)
                with lock:
                    server.requests += 1
                    server.seen[key] = attempt = server.seen.get(key, 0) + 1
                    server.headers.append(dict(self.headers))
                status, content = server.reply(body, attempt)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                                     if status == 200 else {"error": {"message": "overloaded"}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def _jsonl(path) -> list[dict]:
    """One JSON object per "\\n"-ended line (answers may hold characters str.splitlines() would split on)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def _user_text(body) -> str:
    return body["messages"][-1]["content"]


def _answer_a(body) -> str:
    return re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", _user_text(body), re.S).group(1)


def _eval_cfg(url, **over) -> EvalConfig:
    settings = dict(judge="openai", endpoint=url, endpoint_model="judge-1", concurrency=2, max_retries=2,
                    backoff_s=0.01, timeout_s=5)
    return EvalConfig(**{**settings, **over})


def _requests(candidates: list[str]):
    """Both orders of 'teacher answer' vs each candidate answer, as evaluate builds them."""
    prompt = [{"role": "user", "content": "Say something."}]
    return [(judge_messages(prompt, *((t, c) if o == TEACHER_FIRST else (c, t))), o)
            for c in candidates for t in ["teacher answer"] for o in (TEACHER_FIRST, CANDIDATE_FIRST)]


def test_endpoint_judge_parses_retries_transient_errors_and_caches(tmp_path, monkeypatch):
    """Every first attempt gets a 500; the judge prefers 'good', calls 'bad' worse, and rambles on 'odd'."""

    def reply(body, attempt):
        if attempt == 1:
            return 500, ""
        a = _answer_a(body)
        if "odd" in _user_text(body):
            return 200, "I would rather not say."
        return 200, "Verdict: A" if a == "good" or a == "teacher answer" and "bad" in _user_text(body) else "Verdict: B"

    server = JudgeServer(reply)
    monkeypatch.setenv("DADPO_TEST_KEY", "sk-test-secret")
    try:
        judge = EndpointJudge(_eval_cfg(server.url, api_key_env="DADPO_TEST_KEY"), tmp_path / CACHE_NAME)
        verdicts = judge.judge(_requests(["good", "bad", "odd"]))
        labels = [v["label"] for v in verdicts]
        assert labels == ["B", "A", "A", "B", None, None]  # good wins both orders, bad loses both, odd unparseable
        assert [combine_orders(labels[i], labels[i + 1]) for i in (0, 2, 4)] == [1, -1, 0]
        assert server.requests == 12  # 6 verdicts, each after one transient 500
        assert all(h["Authorization"] == "Bearer sk-test-secret" for h in server.headers)
        assert "sk-test-secret" not in (tmp_path / CACHE_NAME).read_text()

        again = EndpointJudge(_eval_cfg(server.url, api_key_env="DADPO_TEST_KEY"), tmp_path / CACHE_NAME)
        assert [v["label"] for v in again.judge(_requests(["good", "bad", "odd"]))] == labels
        assert server.requests == 12 and again.requests_sent == 0  # the cache paid for everything
    finally:
        server.stop()


def test_endpoint_failures_stop_with_the_endpoint_named_and_keep_verdicts(tmp_path):
    """The server answers three requests, then fails for good; later the endpoint is gone entirely."""
    server = JudgeServer(lambda body, attempt: (200, "Verdict: C") if server.requests <= 3 else (503, ""))
    cfg = _eval_cfg(server.url, concurrency=1)
    try:
        with pytest.raises(DadpoError, match=re.escape(server.url) + r".*503.*after 2 retries.*3 verdicts"):
            EndpointJudge(cfg, tmp_path / CACHE_NAME).judge(_requests(["one", "two", "three"]))
        assert len(_jsonl(tmp_path / CACHE_NAME)) == 3
        assert server.requests == 3 + 3  # the failing request: first try and two retries; nothing after it
    finally:
        server.stop()
    with pytest.raises(DadpoError, match=re.escape(server.url) + r".*after 2 retries.*3 verdicts .*kept"):
        EndpointJudge(cfg, tmp_path / CACHE_NAME).judge(_requests(["one", "two", "three"]))
    assert len(_jsonl(tmp_path / CACHE_NAME)) == 3


def test_endpoint_refusal_is_not_retried_and_never_shows_the_key(tmp_path, monkeypatch):
    server = JudgeServer(lambda body, attempt: (401, ""))
    monkeypatch.setenv("DADPO_TEST_KEY", "sk-test-secret")
    try:
        with pytest.raises(DadpoError, match=r"HTTP 401.*DADPO_TEST_KEY") as err:
            EndpointJudge(_eval_cfg(server.url, api_key_env="DADPO_TEST_KEY"), tmp_path / CACHE_NAME).judge(
                _requests(["x"]))
        assert "sk-test-secret" not in str(err.value) and server.requests <= 2  # one per order in flight, no retry
    finally:
        server.stop()


# ------------------------------------------------------------------------------------ on a real Ray cluster
def tiny_cfg(run_dir, *overrides):
    base = {
        "name": "eval-test", "run_dir": str(run_dir),
        "models": {"teacher": {"path": "tiny-teacher"}, "student": {"path": "tiny-student"}},
        "prompts": {"source": str(shared_path("data", "prompts", "conversational_prompts.jsonl")), "limit": 16,
                    "eval_fraction": 0.4},
        "generate": {"max_new_tokens": 8, "topk": 4, "batch_size": 16,
                     "teacher_pool": {"num_cpus": 1}, "student_pool": {"num_cpus": 1}},
        "eval": {"bootstrap": 200, "tie_margin": 0.0},
    }
    return load_config(None, list(overrides), base=base)


@pytest.fixture(scope="module")
def dataset(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval-run")
    manifest = generate(tiny_cfg(run_dir), str(run_dir / "data"))
    assert manifest.rows.get("eval", 0) >= 3
    return run_dir / "data", manifest


def _answers(out_dir):
    return _jsonl(out_dir / ANSWERS_NAME)


def test_llm_judge_end_to_end_with_proxies_and_report(dataset, tmp_path):
    data_dir, manifest = dataset
    cfg = tiny_cfg(tmp_path)
    out = tmp_path / "eval"
    candidates = {"student before": cfg.models.student, "teacher itself": cfg.models.teacher}
    results = evaluate(cfg, str(data_dir), str(out), candidates)

    n = manifest.rows["eval"]
    assert json.loads((out / RESULTS_NAME).read_text()) == results
    answers = _answers(out)
    assert len(answers) == 2 * n and {a["candidate"] for a in answers} == set(candidates)
    for a in answers:  # both orders judged, outcome = their combination
        assert a[f"{TEACHER_FIRST}_label"] in ("A", "B", "C") and a[f"{CANDIDATE_FIRST}_label"] in ("A", "B", "C")
        assert a["outcome"] == combine_logprobs(a[f"{TEACHER_FIRST}_logprobs"], a[f"{CANDIDATE_FIRST}_logprobs"],
                                                cfg.eval.tie_margin, cfg.eval.tie_label)
    for name, r in results["candidates"].items():
        mine = [a for a in answers if a["candidate"] == name]
        assert r["n"] == n and (r["wins"], r["losses"]) == (sum(a["outcome"] == 1 for a in mine),
                                                            sum(a["outcome"] == -1 for a in mine))
        assert r["teacher_nll"] > 0 and r["unparseable"] == 0
    # The teacher read on its own answers: zero KL, full top-1 agreement. The student differs from it.
    teacher, student = results["candidates"]["teacher itself"], results["candidates"]["student before"]
    assert teacher["kl_teacher"] == pytest.approx(0.0, abs=1e-5) and teacher["top1_agreement"] == 1.0
    assert student["kl_teacher"] > 1e-4

    metrics = tmp_path / "metrics.jsonl"  # the lines dadpo_ray.train_worker writes (kd logs no margin)
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1 / s, "margin": None, "reward_acc": None, "tok": 0.5})
                               + "\n" for s in range(1, 6)) + '{"step": 6, "lo')  # a line cut short by a kill
    report = write_report(tmp_path, cfg, results, {"kd run": metrics}, open_dataset(str(data_dir)))
    page = (tmp_path / "report.html").read_text()
    assert report.read_text().count("![") == 2 and "student before" in report.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and "<img" in page and manifest.config_fingerprint in page and "eval-test" in page
    import matplotlib.image

    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        (tmp_path / "check.png").write_bytes(png)
        height, width, _ = matplotlib.image.imread(tmp_path / "check.png").shape
        assert height > 100 and width > 300
    table = format_table(results)
    assert "student before" in table and "teacher itself" in table and len(table.splitlines()) == 4


def test_openai_judge_end_to_end_cache_rerun_and_unreachable(dataset, tmp_path):
    """A position-biased endpoint (always "A") yields only ties; its rambling on one prompt is unparseable."""
    data_dir, manifest = dataset
    eval_rows = [r for r in read_rows(str(data_dir), manifest.files).to_pylist() if r["split"] == "eval"]
    odd_prompt = sorted(eval_rows, key=lambda r: r["id"])[0]["prompt_messages"][0]["content"]

    def reply(body, attempt):
        if attempt == 1:
            return 500, ""  # transient: every request fails once
        return 200, "Hmm, both have merit." if odd_prompt in _user_text(body) else "Verdict: A"

    server = JudgeServer(reply)
    try:
        cfg = tiny_cfg(tmp_path, "eval.judge=openai", f"eval.endpoint={server.url}", "eval.endpoint_model=j",
                       "eval.backoff_s=0.01", "eval.max_retries=2")
        out = tmp_path / "eval"
        student = {"student before": cfg.models.student}
        results = evaluate(cfg, str(data_dir), str(out), student)
        n = manifest.rows["eval"]
        r = results["candidates"]["student before"]
        assert (r["wins"], r["ties"], r["losses"], r["unparseable"]) == (0, n, 0, 2)
        assert r["preference_rate"] == 0.0 and r["preference_rate_ci"] == [0.0, 0.0]
        assert server.requests == 2 * (2 * n) and results["endpoint_requests"] == 2 * (2 * n)
        assert len(_jsonl(out / CACHE_NAME)) == 2 * n

        again = evaluate(cfg, str(data_dir), str(out), student)  # same answers reused, every verdict cached
        assert server.requests == 4 * n and again["endpoint_requests"] == 0
        assert again["candidates"] == results["candidates"]
    finally:
        server.stop()
    other_judge = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"endpoint_model": "j2"})})
    with pytest.raises(DadpoError, match=re.escape(server.url) + ".*after 2 retries"):  # server gone, new verdicts
        evaluate(other_judge, str(data_dir), str(out), student)
    assert len(_jsonl(out / CACHE_NAME)) == 2 * n  # nothing lost
    assert not (out / RESULTS_NAME).exists()  # the run did not finish


def test_eval_prompts_repeating_training_prompts_are_refused(dataset, tmp_path):
    data_dir, manifest = dataset
    rows = read_rows(str(data_dir), manifest.files).to_pylist()
    train_row = next(r for r in rows if r["split"] == "train")
    leaked = next(r for r in rows if r["split"] == "eval")
    leaked["prompt_messages"] = [{"role": m["role"], "content": "  " + m["content"].replace(" ", "  ")}
                                 for m in train_row["prompt_messages"]]  # same prompt up to whitespace
    bad_dir = tmp_path / "leaky"
    write_shard(str(bad_dir), "part-0.parquet", rows)
    write_manifest(str(bad_dir), read_manifest(str(data_dir)).model_copy(update={"files": ["part-0.parquet"]}))
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(DadpoError, match=f"eval {leaked['id']} = train {train_row['id']}"):
        evaluate(cfg, str(bad_dir), str(tmp_path / "eval"), {"student": cfg.models.student})
    with pytest.raises(DadpoError, match="no eval rows"):
        held_out_rows([r for r in rows if r["split"] == "train"], "data")
    with pytest.raises(DadpoError, match="/nonexistent/model"):
        evaluate(cfg, str(data_dir), str(tmp_path / "eval"), {"x": ModelSpec(path="/nonexistent/model")})
    broken = tmp_path / "broken-model"  # a trained model dir whose export died before the weights
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(DadpoError, match=f"model {re.escape(str(broken))} \\(student after\\): not a loadable"):
        evaluate(cfg, str(data_dir), str(tmp_path / "eval"), {"student after": ModelSpec(path=str(broken))})
