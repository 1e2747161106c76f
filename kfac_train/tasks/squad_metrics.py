"""SQuAD v1.1 exact match and F1, as defined by the official evaluation script.

Definitions (Rajpurkar et al., 2016, evaluation script v1.1):

- *normalise* an answer: lowercase; delete every ASCII punctuation character; delete the
  articles ``a``, ``an``, ``the`` as whole words; collapse runs of whitespace to one space and
  strip the ends.
- *exact match* of a prediction and one ground truth: 1 if the normalised strings are equal.
- *F1* of a prediction and one ground truth: split both normalised strings on whitespace;
  common = the size of the multiset intersection of the two token lists; 0 if common is 0, else
  ``2·P·R / (P + R)`` with ``P = common / len(prediction tokens)`` and
  ``R = common / len(ground-truth tokens)``.
- A question's score is the maximum over its ground truths; the dataset's EM and F1 are the means
  over questions, reported in percent. A question without a prediction scores 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1(prediction: str, ground_truth: str) -> float:
    """Token-overlap F1 of the normalised strings, in [0, 1]."""
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    common = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def _best(metric: Callable[[str, str], float], prediction: str, truths: Sequence[str]) -> float:
    if not truths:
        raise ValueError("a question has no ground-truth answers; SQuAD v1.1 needs at least one")
    return max(metric(prediction, truth) for truth in truths)


def squad_scores(
    predictions: Mapping[str, str], ground_truths: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Dataset exact match and F1 in percent.

    Args:
        predictions: question id → predicted answer text.
        ground_truths: question id → its ground-truth answer texts (every question counts).

    Returns:
        ``{"exact_match": EM, "f1": F1, "num_questions": n}`` with EM, F1 in [0, 100].
    """
    if not ground_truths:
        raise ValueError("no questions to score")
    em_total = f1_total = 0.0
    for qid, truths in ground_truths.items():
        if qid not in predictions:
            continue
        em_total += _best(exact_match, predictions[qid], truths)
        f1_total += _best(f1, predictions[qid], truths)
    n = len(ground_truths)
    return {
        "exact_match": 100.0 * em_total / n,
        "f1": 100.0 * f1_total / n,
        "num_questions": float(n),
    }
