"""Pairwise judging, the pure part: the judge prompt, reading a verdict, both orders, rates with intervals.

Every comparison is asked twice, once with the teacher's answer first and once with the candidate's first, to
cancel the judge's position bias:

- judge='openai' (labels): each order gives the candidate +1 (its answer won), 0 (tie) or -1 (lost); the two are
  summed and the sign is the outcome, so a judge that always picks "A" yields a tie, never a win.
- judge='llm' (label log-probs): the candidate's log-odds log p(its label) - log p(teacher's label) are summed
  over both orders, d = (lp_B - lp_A)[teacher first] + (lp_A - lp_B)[candidate first], so a constant preference
  for one position cancels exactly; |d| < tie_margin is a tie, else the sign of d. With `tie_label`, a judge
  whose likeliest label is the tie label "C" in both orders declares a tie. Small judges (SmolLM2-135M) favour
  "C" and "B" whatever the answers, yet their A-vs-B log-odds still separate a sensible answer from nonsense.

    win rate         = wins / n
    preference rate  = win rate - loss rate       (the daDPO paper's headline metric, Table 2)

Intervals are percentile bootstrap 95% intervals over prompts (resampling the per-prompt outcomes).
"""

from __future__ import annotations

import math
import re

import numpy as np

# The three labels a judge answers with. A judge model is read from the log-probs of " A" / " B" / " C" after
# the prefill "Verdict:"; an endpoint is asked to reply with one letter.
LABELS = ("A", "B", "C")  # C = tie
PREFILL = "Verdict:"
TEACHER_FIRST, CANDIDATE_FIRST = "teacher_first", "candidate_first"
ORDERS = (TEACHER_FIRST, CANDIDATE_FIRST)

JUDGE_SYSTEM = (
    "You are an impartial judge of chat assistants. You compare two answers to the same conversation and decide "
    "which one is more helpful, correct, clear and natural. The order of the answers must not influence you, "
    "nor their length."
)
JUDGE_TEMPLATE = """[Conversation]
{conversation}

[Answer A]
{first}

[Answer B]
{second}

Which answer is better? Reply with a single letter: A if answer A is better, B if answer B is better, C if they are \
equally good. Reply in the form "Verdict: X"."""


def render_conversation(messages: list[dict]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def judge_messages(prompt_messages: list[dict], first: str, second: str) -> list[dict]:
    """The chat a judge sees for one order: answer A = `first`, answer B = `second`."""
    user = JUDGE_TEMPLATE.format(conversation=render_conversation(prompt_messages), first=first, second=second)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def ordered_answers(order: str, teacher: str, candidate: str) -> tuple[str, str]:
    return (teacher, candidate) if order == TEACHER_FIRST else (candidate, teacher)


# --------------------------------------------------------------------------------------- reading a verdict
def label_from_logprobs(logprobs: list[float], tie_margin: float) -> str | None:
    """Label from the judge's log-probs of the labels (A, B, C): C if C is the most likely, or if A and B are
    within `tie_margin` nats of each other; else the likelier of A and B. None (unparseable) if not finite."""
    if len(logprobs) != len(LABELS) or not all(math.isfinite(x) for x in logprobs):
        return None
    a, b, c = logprobs
    if c >= max(a, b) or abs(a - b) < tie_margin:
        return "C"
    return "A" if a > b else "B"


_VERDICT = re.compile(r"verdict\W*([ABC])\b", re.IGNORECASE)
_ALONE = re.compile(r"^\W*([ABC])\W*$", re.IGNORECASE)
_TIE = re.compile(r"^\W*(tie|equal|equally good)\W*$", re.IGNORECASE)


def parse_label(text: str | None) -> str | None:
    """Label from a judge's reply: "Verdict: B", "**A**", "c", "tie". None when it says anything else."""
    text = (text or "").strip()
    verdicts = {m.upper() for m in _VERDICT.findall(text)}
    if len(verdicts) == 1:
        return verdicts.pop()
    if len(verdicts) > 1:
        return None  # contradicts itself
    if m := _ALONE.match(text):
        return m.group(1).upper()
    return "C" if _TIE.match(text) else None


def candidate_score(label: str | None, order: str) -> int:
    """+1 if the candidate's answer won this order, -1 if the teacher's did, 0 for a tie or an unparseable label."""
    if label not in ("A", "B"):
        return 0
    candidate_label = "B" if order == TEACHER_FIRST else "A"
    return 1 if label == candidate_label else -1


def combine_orders(teacher_first: str | None, candidate_first: str | None) -> int:
    """Outcome of one prompt for the candidate from the labels of both orders: +1 win, 0 tie, -1 loss."""
    total = candidate_score(teacher_first, TEACHER_FIRST) + candidate_score(candidate_first, CANDIDATE_FIRST)
    return (total > 0) - (total < 0)


def candidate_logodds(logprobs: list[float], order: str) -> float:
    """log p(candidate's label) - log p(teacher's label) in one order, from the (A, B, C) label log-probs."""
    a, b = logprobs[0], logprobs[1]
    return b - a if order == TEACHER_FIRST else a - b


def combine_logprobs(teacher_first: list[float], candidate_first: list[float], tie_margin: float,
                     tie_label: bool = True) -> int:
    """Outcome of one prompt for the candidate from the judge's label log-probs in both orders (see the top)."""
    labels = [label_from_logprobs(teacher_first, 0.0), label_from_logprobs(candidate_first, 0.0)]
    if None in labels or (tie_label and labels == ["C", "C"]):
        return 0  # unparseable counts as a tie
    d = candidate_logodds(teacher_first, TEACHER_FIRST) + candidate_logodds(candidate_first, CANDIDATE_FIRST)
    return 0 if abs(d) < tie_margin else (1 if d > 0 else -1)


# ------------------------------------------------------------------------------------------------- rates
def bootstrap_interval(outcomes: list[int], statistic, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of `statistic(outcomes)` over `resamples` resamplings of the prompts."""
    values = np.asarray(outcomes, dtype=np.int8)  # [n]
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, values.size, size=(resamples, values.size))]  # [R, n]
    stats = statistic(draws)  # [R]
    low, high = np.percentile(stats, [2.5, 97.5])
    return (float(low), float(high))


def win_rate(draws: np.ndarray) -> np.ndarray:
    return (draws == 1).mean(-1)


def preference_rate(draws: np.ndarray) -> np.ndarray:
    return (draws == 1).mean(-1) - (draws == -1).mean(-1)


def summarize(outcomes: list[int], resamples: int, seed: int) -> dict:
    """Wins, ties, losses and rates of one candidate, with bootstrap 95% intervals (None without outcomes)."""
    n = len(outcomes)
    wins, losses = outcomes.count(1), outcomes.count(-1)
    if n == 0:
        return {"n": 0, "wins": 0, "ties": 0, "losses": 0, "win_rate": None, "tie_rate": None, "loss_rate": None,
                "preference_rate": None, "win_rate_ci": None, "preference_rate_ci": None}
    return {
        "n": n, "wins": wins, "ties": n - wins - losses, "losses": losses,
        "win_rate": wins / n, "tie_rate": (n - wins - losses) / n, "loss_rate": losses / n,
        "preference_rate": (wins - losses) / n,
        "win_rate_ci": list(bootstrap_interval(outcomes, win_rate, resamples, seed)),
        "preference_rate_ci": list(bootstrap_interval(outcomes, preference_rate, resamples, seed)),
    }
