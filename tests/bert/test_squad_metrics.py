"""The official SQuAD v1.1 exact-match and F1 definitions, checked against hand-computed values."""

from __future__ import annotations

import pytest

from kfac_train.tasks.squad_metrics import exact_match, f1, normalize_answer, squad_scores


def test_normalisation_lowercases_and_drops_punctuation_articles_and_extra_spaces() -> None:
    assert normalize_answer("  The Cat,  sat!  ") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    # Articles are removed only as whole words.
    assert normalize_answer("Theatre and anthem") == "theatre and anthem"
    assert normalize_answer("U.S.A.") == "usa"


def test_exact_match_compares_normalised_strings() -> None:
    assert exact_match("the Danube.", "Danube") == 1.0
    assert exact_match("Danube River", "Danube") == 0.0


def test_f1_is_the_harmonic_mean_of_token_precision_and_recall() -> None:
    # "the cat sat on a mat" -> [cat, sat, on, mat]; truth [cat, sat]: P = 2/4, R = 2/2.
    assert f1("the cat sat on a mat", "cat sat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    # Overlap counts repeated tokens as a multiset: [b, b, c] vs [b, b, d]: common 2, P = R = 2/3.
    assert f1("a b b c", "b b d") == pytest.approx(2 / 3)
    # [b, b] vs [b]: common 1, P = 1/2, R = 1 -> 2/3.
    assert f1("b b", "b") == pytest.approx(2 / 3)
    assert f1("nothing shared", "entirely different") == 0.0
    assert f1("", "answer") == 0.0


def test_dataset_scores_take_the_best_ground_truth_and_count_missing_answers_as_zero() -> None:
    truths = {
        "q1": ["the Danube", "Danube River"],
        "q2": ["1848"],
        "q3": ["Vienna"],
    }
    predictions = {
        "q1": "Danube river",  # exact match with the second ground truth
        "q2": "in the year 1848",  # [in, year, 1848] vs [1848]: P = 1/3, R = 1, F1 = 1/2
        # q3 has no prediction: scores 0
    }
    scores = squad_scores(predictions, truths)
    assert scores["exact_match"] == pytest.approx(100 * 1 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert scores["num_questions"] == 3


def test_a_question_without_ground_truth_is_rejected() -> None:
    with pytest.raises(ValueError, match="no ground-truth"):
        squad_scores({"q": "x"}, {"q": []})
