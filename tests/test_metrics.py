"""ROUGE-L, exact match, perplexity and seed statistics: hand-worked values and the official definitions."""

import math
import random
import string

import pytest
from rouge_score import rouge_scorer

from minitodi.metrics import (
    exact_match,
    lcs_length,
    mean_se,
    normalize_answer,
    paired_difference,
    perplexity,
    rouge_l,
    rouge_tokens,
    t_quantile,
)

# words where the Porter stemmer, punctuation, case or non-ASCII letters matter
WORDS = [
    "the", "a", "cats", "cat", "running", "runs", "ran", "happily", "happy", "generously", "general",
    "generalization", "agreed", "agreement", "connection", "connected", "was", "were", "is", "be", "being",
    "relational", "conditional", "rational", "hesitancy", "digitizer", "radically", "differently",
    "analogously", "dying", "lying", "sky", "skies", "died", "flies", "flying", "news", "e-mail", "email",
    "It's", "its", "2-for-1", "café", "naïve", "Über", "ABC", "yes,", "no.", "don't", "(maybe)", "42", "4.2",
    "x+y", "fruit", "fruits", "Banana!", "bananas", "ponies", "caresses", "sized", "size", "meeting",
    "meetings", "generously", "agreement's",
]


def random_text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 14)))


def upper_with_punctuation(text, rng):
    """``text`` upper-cased, with a random punctuation mark after about one character in ten."""
    out = []
    for ch in text:
        mark = rng.choice(string.punctuation) if rng.random() < 0.1 else ""
        out.append(ch.upper() + mark)
    return "".join(out)


def official_normalize_answer(s):
    """The official evaluation's normalize_answer, written as its three steps."""
    lowered, exclude = s.lower(), set(string.punctuation)
    no_punctuation = "".join(ch for ch in lowered if ch not in exclude)
    return " ".join(no_punctuation.split())


def test_rouge_l_equals_rouge_score_with_stemmer_on_random_pairs():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rng = random.Random(0)
    for _ in range(3000):
        prediction = random_text(rng)
        references = [random_text(rng) for _ in range(rng.randint(1, 3))]
        expected = max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references) * 100
        assert rouge_l(prediction, references) == expected, (prediction, references)


def test_exact_match_equals_the_official_normalization_on_random_pairs():
    rng = random.Random(1)
    for _ in range(4000):
        prediction = random_text(rng)
        references = [random_text(rng) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.5:  # a likely match: the prediction with case changed and punctuation inserted
            references.append(upper_with_punctuation(prediction, rng))
        expected = 100.0 * max(official_normalize_answer(prediction) == official_normalize_answer(r)
                               for r in references)
        assert exact_match(prediction, references) == expected, (prediction, references)


def test_stemmed_tokens():
    assert rouge_tokens("The cats were running, happily!") == ("the", "cat", "were", "run", "happili")
    assert rouge_tokens("was its café") == ("was", "its", "caf")  # <= 3 characters: not stemmed
    assert rouge_tokens(" ... ") == ()


def test_normalize_answer_deletes_punctuation_instead_of_splitting():
    assert normalize_answer("  It's an E-mail,\tnot  a letter! ") == "its an email not a letter"
    assert exact_match("e-mail", "email") == 100.0
    assert exact_match("It's", "Its") == 100.0
    assert exact_match("café", "caf") == 0.0  # unlike ROUGE's tokens, non-ASCII letters survive


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
    # stemmed: "killed" -> "kill", so the token lists are equal
    ("police killed the gunman", "police kill the gunman", 100.0),
    # pred: a b c d (4) / ref: b d e (3); LCS = "b d" (2); P = 1/2, R = 2/3
    # F = 2 (1/2)(2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    ("a b c d", "b d e", 400 / 7),
    # punctuation, case and plural vanish: identical token lists
    ("Hello, Worlds!", "hello world", 100.0),
    ("apple pie", "banana split", 0.0),
])
def test_rouge_l_hand_worked(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-9)


def test_rouge_l_takes_the_max_over_references():
    # vs "apple": LCS 0 -> 0.  vs "banana split": LCS "banana" (1); P = 1, R = 1/2 -> F = 2/3
    assert rouge_l("banana", ["apple", "banana split"]) == pytest.approx(200 / 3)
    assert rouge_l("banana", ["apple", "banana split", "Bananas."]) == 100.0


@pytest.mark.parametrize("prediction, reference", [("", "a cat"), ("a cat", ""), ("", ""), ("!!!", "a cat")])
def test_rouge_l_is_zero_when_either_side_has_no_tokens(prediction, reference):
    assert rouge_l(prediction, reference) == 0.0


def test_exact_match_scans_references():
    assert exact_match("Banana.", ["apple", "banana"]) == 100.0
    assert exact_match("  TUESDAY ", "Tuesday") == 100.0
    assert exact_match("a banana", ["banana"]) == 0.0
    assert exact_match("", ["banana"]) == 0.0
    assert exact_match("", ["!"]) == 100.0


def test_bad_references_are_errors():
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l("x", [])
    with pytest.raises(TypeError, match="expected str"):
        exact_match(None, ["x"])
    with pytest.raises(TypeError, match="expected str"):
        rouge_l("x", [3])


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(1e4) == math.inf
    with pytest.raises(ValueError):
        perplexity(float("nan"))
    with pytest.raises(ValueError):
        perplexity(-0.1)


def test_mean_se():
    # values 1, 2, 6: mean 3; squared deviations 4 + 1 + 9 = 14; sample variance 14 / 2 = 7
    assert mean_se([1, 2, 6]) == pytest.approx((3.0, math.sqrt(7.0 / 3), 3))
    mean, se, n = mean_se([4.5])
    assert mean == 4.5 and n == 1 and math.isnan(se)
    with pytest.raises(ValueError):
        mean_se([])


@pytest.mark.parametrize("p", [0.9, 0.975, 0.995])
def test_t_quantile_closed_forms(p):
    # df = 1 is the Cauchy law: F(t) = 1/2 + atan(t)/pi, so t_p = tan(pi (p - 1/2))
    assert t_quantile(1, p) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so t_p = (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(2, p) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)
    # df = 1000: Cornish-Fisher, t = z + (z^3 + z) / (4 df) + O(1/df^2), z the normal quantile
    z = -math.sqrt(2) * _erfcinv(2 * p)
    assert t_quantile(1000, p) == pytest.approx(z + (z ** 3 + z) / 4000, rel=1e-5)


def _erfcinv(y):
    lo, hi = -10.0, 10.0  # erfc decreases: bisection for erfc(x) = y
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erfc(mid) > y else (lo, mid)
    return lo


@pytest.mark.parametrize("df, printed", [(3, 3.182), (4, 2.776), (5, 2.571), (6, 2.447), (9, 2.262),
                                         (10, 2.228), (30, 2.042)])
def test_t_quantile_matches_printed_tables(df, printed):
    assert t_quantile(df) == pytest.approx(printed, abs=5e-4)  # tables print 3 decimals


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (3, 4, 5, 6, 9, 10, 29, 30, 31, 120):
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-12)


def test_paired_difference():
    # differences 2, 3, 0: mean 5/3, sample variance ((1/3)^2 + (4/3)^2 + (5/3)^2) / 2 = 7/3,
    # standard error sqrt(7/3 / 3) = sqrt(7)/3, half-width t_{0.975, 2} sqrt(7)/3
    result = paired_difference([3, 5, 4], [1, 2, 4])
    half = t_quantile(2) * math.sqrt(7) / 3
    assert result["n"] == 3 and result["per_seed"] == [2.0, 3.0, 0.0]
    assert result["mean"] == pytest.approx(5 / 3)
    assert result["ci95"] == pytest.approx([5 / 3 - half, 5 / 3 + half])
    assert paired_difference([3], [1]) == {"mean": 2.0, "ci95": None, "n": 1, "per_seed": [2.0]}
    with pytest.raises(ValueError, match="as many"):
        paired_difference([1, 2], [1])
    with pytest.raises(ValueError, match="df"):
        t_quantile(0)
