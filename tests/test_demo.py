"""`dadpo-ray demo --quick`: the demo's exact path (prune, generate, train, eval, report) with tiny models."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_demo_runs_end_to_end_and_reports(ray_cluster, tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)  # join the session's Ray
    result = subprocess.run([sys.executable, "-m", "dadpo_ray", "demo", "--quick", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == f"report: {out / 'report.md'}" and lines[-1].startswith("demo finished in ")
    assert any(line.startswith("stage times: prune ") for line in lines)
    assert any(line.startswith("student before ") for line in lines) and any(line.startswith("daDPO student ")
                                                                             for line in lines)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert "student before" in json.dumps(results) and "daDPO student" in json.dumps(results)
    assert (out / "model" / "model.safetensors").exists() and (out / "student-pruned" / "config.json").exists()
    report = (out / "report.md").read_text()
    assert "daDPO student" in report and "manifest" in report.lower()
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # A rerun skips every completed stage.
    again = subprocess.run([sys.executable, "-m", "dadpo_ray", "demo", "--quick", "--out", str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already complete, skipped") == 4  # prune, generate, train, eval
