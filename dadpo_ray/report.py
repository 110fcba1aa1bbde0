"""The run report: `report.md` and the same as a self-contained `report.html` (images inlined as base64).

Sections: the eval results table, the training curves (loss, margin, reward accuracy per optimizer step, from
each training run's metrics.jsonl), a win/tie/loss bar chart, the exact config (YAML) and the dataset manifest.
The PNGs are also written beside the report (`report_curves.png`, `report_verdicts.png`) for report.md.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import yaml

from dadpo_ray.config import RecipeConfig

CURVES = (("loss", "loss"), ("margin", "margin (daDPO m)"), ("reward_acc", "reward accuracy"))
CURVES_PNG, VERDICTS_PNG = "report_curves.png", "report_verdicts.png"
METRICS_NAME = "metrics.jsonl"  # written by dadpo_ray.train_worker under <run_dir>/train/<name>/


# ------------------------------------------------------------------------------------------------- table
def _pct(x, sign: bool = True) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%" if sign else f"{100 * x:.1f}%"


def _ci(ci, sign: bool = True) -> str:
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return ""
    return f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if sign else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and one row of strings per candidate; the terminal, markdown and HTML tables all use these."""
    header = ["model", "n", "win", "tie", "loss", "win rate [95% CI]", "pref. rate [95% CI]", "unparseable",
              "teacher NLL", "top-1 agree", "KL(t‖m)"]
    rows = []
    for name, r in results["candidates"].items():
        judged = results.get("judge") != "none"
        rows.append([
            name, str(r["n"] if judged else "-"),
            *([str(r["wins"]), str(r["ties"]), str(r["losses"])] if judged else ["-"] * 3),
            _pct(r["win_rate"], sign=False) + _ci(r["win_rate_ci"], sign=False),
            _pct(r["preference_rate"]) + _ci(r["preference_rate_ci"]),
            str(r["unparseable"]) if judged else "-",
            _num(r["teacher_nll"]), f"{100 * r['top1_agreement']:.1f}%",
            _num(max(r["kl_teacher"], 0.0), 4),  # a KL is >= 0; -1e-10 is float noise
        ])
    return header, rows


def format_table(results: dict) -> str:
    """Fixed-width table for the terminal."""
    header, rows = table_rows(results)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _markdown_table(results: dict) -> str:
    header, rows = table_rows(results)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def _html_table(results: dict) -> str:
    header, rows = table_rows(results)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------------------------- plots
def read_metrics(path: Path) -> list[dict]:
    """The metrics log's lines as dicts; a line cut short (a killed run) or not JSON is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _points(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(step, value) pairs where both are finite numbers; missing keys and None (NaN logged as null) drop out."""
    pairs = [(r.get("step", i + 1), r.get(key)) for i, r in enumerate(rows)]
    pairs = [(s, v) for s, v in pairs if isinstance(s, (int, float)) and isinstance(v, (int, float))
             and math.isfinite(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_curves(runs: dict[str, list[dict]], path: Path) -> bool:
    """One panel per curve, one line per training run; False (nothing written) when no run logged any of them."""
    if not any(_points(rows, key)[0] for rows in runs.values() for key, _ in CURVES):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4), constrained_layout=True)
    for ax, (key, title) in zip(axes, CURVES):
        drawn = False
        for name, rows in runs.items():
            steps, values = _points(rows, key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged by this loss", ha="center", va="center", transform=ax.transAxes)
        elif len(runs) > 1:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_verdicts(results: dict, path: Path) -> bool:
    """Stacked bars of each candidate's win / tie / loss shares; False when there was no judge."""
    judged = {name: r for name, r in results["candidates"].items() if r.get("n")}
    if results.get("judge") == "none" or not judged:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(judged)
    fig, ax = plt.subplots(figsize=(7.5, 0.7 * len(names) + 1.6), constrained_layout=True)
    left = [0.0] * len(names)
    for key, label, color in (("wins", "win", "#2e8b57"), ("ties", "tie", "#b0b0b0"), ("losses", "loss", "#c0392b")):
        shares = [judged[n][key] / judged[n]["n"] for n in names]
        ax.barh(names, shares, left=left, color=color, label=label)
        for y, (x0, share, name) in enumerate(zip(left, shares, names)):
            if share >= 0.06:
                ax.text(x0 + share / 2, y, str(judged[name][key]), ha="center", va="center", fontsize=9)
        left = [a + b for a, b in zip(left, shares)]
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel(f"share of {results['eval_prompts']} held-out prompts, vs the teacher's answer")
    ax.set_title(f"judge: {results.get('judge_model') or results['judge']} (both orders)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.12), ncol=3, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------ report
def _default_metrics(run_dir: Path, cfg: RecipeConfig) -> dict[str, Path]:
    path = run_dir / "train" / cfg.name / METRICS_NAME
    return {cfg.name: path} if path.exists() else {}


def _manifest_json(manifest) -> str:
    if manifest is None:
        return "(no manifest)"
    data = manifest.model_dump(mode="json") if hasattr(manifest, "model_dump") else manifest
    return json.dumps(data, indent=2)


def write_report(run_dir, cfg: RecipeConfig, results: dict, metrics_jsonl_paths: dict | None = None,
                 manifest=None) -> Path:
    """Write report.md, report.html and their PNGs into `run_dir`; returns the path of report.md.

    metrics_jsonl_paths: training run label -> metrics.jsonl (None = `<run_dir>/train/<cfg.name>/metrics.jsonl`
    when it exists); manifest: the dataset's `records.Manifest` (or its dict)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = _default_metrics(run_dir, cfg) if metrics_jsonl_paths is None else metrics_jsonl_paths
    runs = {name: read_metrics(Path(p)) for name, p in paths.items() if Path(p).exists()}
    images = [(title, run_dir / name) for title, name, drawn in (
        ("Training curves", CURVES_PNG, plot_curves(runs, run_dir / CURVES_PNG)),
        ("Win / tie / loss against the teacher", VERDICTS_PNG, plot_verdicts(results, run_dir / VERDICTS_PNG)),
    ) if drawn]

    title = f"dadpo-ray report: {cfg.name}"
    about = (f"{results['eval_prompts']} held-out prompts, answers up to {results['max_new_tokens']} tokens; "
             f"teacher {results['teacher']}; judge: {results['judge']}"
             + (f" ({results['judge_model']})" if results.get("judge_model") else "") + f"; {results['created_at']}")
    notes = ("Each answer is compared with the teacher's answer to the same prompt, in both orders (position bias "
             "cancels: the two verdicts are summed). Preference rate = win rate - loss rate. Intervals: bootstrap "
             f"95% over prompts ({results['bootstrap']} resamples). Unparseable verdicts count as ties. Offline "
             "proxies, no judge: teacher NLL = the teacher's per-token NLL of the model's answers; top-1 agree and "
             "KL(t‖m) = the model's agreement with the teacher's top-1 and KL(teacher || model) (top-k + tail) on "
             "the teacher's held-out answers.")
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    manifest_json = _manifest_json(manifest)
    missing_curves = "" if runs else "No training metrics found (training not run, or its metrics.jsonl missing)."

    md = [f"# {title}", "", about, "", "## Results", "", _markdown_table(results), "", notes, ""]
    for heading, path in images:
        md += [f"## {heading}", "", f"![{heading}]({path.name})", ""]
    if missing_curves:
        md += [missing_curves, ""]
    md += ["## Config", "", "```yaml", config_yaml.rstrip(), "```", "", "## Dataset manifest", "", "```json",
           manifest_json, "```", ""]
    (run_dir / "report.md").write_text("\n".join(md), encoding="utf-8")

    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
             "td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto}"
             "img{max-width:100%}")
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(about)}</p>", "<h2>Results</h2>",
            _html_table(results), f"<p>{html.escape(notes)}</p>"]
    for heading, path in images:
        data = base64.b64encode(path.read_bytes()).decode()
        body += [f"<h2>{html.escape(heading)}</h2>", f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{data}">']
    if missing_curves:
        body.append(f"<p>{html.escape(missing_curves)}</p>")
    body += ["<h2>Config</h2>", f"<pre>{html.escape(config_yaml)}</pre>", "<h2>Dataset manifest</h2>",
             f"<pre>{html.escape(manifest_json)}</pre>"]
    page = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    (run_dir / "report.html").write_text(page, encoding="utf-8")
    return run_dir / "report.md"
