"""ROUGE-L, exact match, perplexity and seed statistics against values worked out by hand."""

import math

import pytest

from minitodi.metrics import exact_match, lcs_length, mean_and_spread, normalize_tokens, perplexity, rouge_l


def test_normalization_follows_rouge_score_default_tokenizer():
    assert normalize_tokens("Hello, World!  it's 2-for-1") == ["hello", "world", "it", "s", "2", "for", "1"]
    assert normalize_tokens("café") == ["caf"]  # only ASCII letters and digits survive
    assert normalize_tokens(" ... ") == []


@pytest.mark.parametrize("a, b, expected", [
    ("abcbdab", "bdcaba", 4),  # textbook pair: one LCS is b c b a
    ("ab", "ba", 1),            # order matters
    ("abc", "", 0),
    ("abc", "abc", 3),
])
def test_lcs_length(a, b, expected):
    assert lcs_length(list(a), list(b)) == expected
    assert lcs_length(list(b), list(a)) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    # pred: the cat sat on the mat / ref: the cat is on the mat
    # LCS = "the cat on the mat" (5 tokens); P = R = 5/6 -> F = 5/6
    ("the cat sat on the mat", "the cat is on the mat", 500 / 6),
    # pred: police killed the gunman / ref: police kill the gunman
    # LCS = "police the gunman" (3); P = R = 3/4 -> F = 3/4
    ("police killed the gunman", "police kill the gunman", 75.0),
    # pred: a b c d (4) / ref: b d e (3); LCS = "b d" (2); P = 1/2, R = 2/3
    # F = 2 (1/2)(2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    ("a b c d", "b d e", 400 / 7),
    # punctuation and case vanish: identical token lists
    ("Hello, World!", "hello world", 100.0),
    # no common token
    ("apple pie", "banana split", 0.0),
])
def test_rouge_l_hand_worked(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-9)


def test_rouge_l_takes_the_max_over_references():
    # vs "apple": LCS 0 -> 0.  vs "banana split": LCS "banana" (1); P = 1, R = 1/2 -> F = 2/3
    assert rouge_l("banana", ["apple", "banana split"]) == pytest.approx(200 / 3)
    assert rouge_l("banana", ["apple", "banana split", "Banana."]) == 100.0


@pytest.mark.parametrize("prediction, reference", [("", "a cat"), ("a cat", ""), ("", ""), ("!!!", "a cat")])
def test_rouge_l_is_zero_when_either_side_has_no_tokens(prediction, reference):
    assert rouge_l(prediction, reference) == 0.0


def test_exact_match_normalizes_and_scans_references():
    assert exact_match("Banana.", ["apple", "banana"]) == 100.0
    assert exact_match("  TUESDAY ", "Tuesday") == 100.0
    assert exact_match("a banana", ["banana"]) == 0.0
    assert exact_match("", ["banana"]) == 0.0
    assert exact_match("", [""]) == 100.0


def test_bad_references_are_errors():
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l("x", [])
    with pytest.raises(TypeError, match="expected str"):
        exact_match(None, ["x"])


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(1e4) == math.inf
    with pytest.raises(ValueError):
        perplexity(float("nan"))
    with pytest.raises(ValueError):
        perplexity(-0.1)


def test_mean_and_spread():
    # values 1, 2, 6: mean 3; squared deviations 4 + 1 + 9 = 14; sample variance 14 / 2 = 7
    mean, std, n = mean_and_spread([1, 2, 6])
    assert (mean, n) == (3.0, 3)
    assert std == pytest.approx(math.sqrt(7.0))
    mean, std, n = mean_and_spread([4.5])
    assert mean == 4.5 and n == 1 and math.isnan(std)
    with pytest.raises(ValueError):
        mean_and_spread([])
