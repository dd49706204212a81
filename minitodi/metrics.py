"""Evaluation numbers as the ToDi paper computes them: ROUGE-L, exact match, perplexity; seed statistics.

Pure Python and NumPy: generated text is scored on the host.

**ROUGE-L** is the official evaluation's (``rouge_metric.py`` of the ToDi and MiniLLM repositories):
Google's ``rouge_score`` with ``RougeScorer(['rougeL'], use_stemmer=True)``, F-measure, max over the
references, x100. Its tokens: lowercase, every run of characters outside ``[a-z0-9]`` -> a space, split,
then NLTK's Porter stemmer on tokens longer than 3 characters ("cats" -> "cat", "running" -> "run").
The tokens come from ``rouge_score`` itself (a dependency): NLTK's stemmer is the original algorithm plus
NLTK's own extensions and exceptions, and only that code reproduces the paper's numbers to the last digit.
The rest is written here: with L the length of the longest common subsequence of an m-token prediction
and an n-token reference, P = L/m, R = L/n, F = 2PR/(P+R) (0 when L = 0 or either side has no token).

**Exact match** is the official ``normalize_answer``: lowercase, delete every character of
``string.punctuation``, collapse whitespace; 100 when the prediction equals some reference, else 0.
So "e-mail" equals "email", and "It's" equals "its".

**Over seeds**: the mean, its standard error s/sqrt(n), and Student-t 95% intervals for paired differences
(students of one training seed share init and data order, so todi - fkl is taken seed by seed).
"""

import functools
import math
import string

import numpy as np

_PUNCTUATION = str.maketrans("", "", string.punctuation)


@functools.lru_cache(maxsize=1)
def _rouge_tokenizer():
    from rouge_score.tokenizers import DefaultTokenizer  # imports NLTK (~1 s): only when text is scored

    return DefaultTokenizer(use_stemmer=True)


@functools.lru_cache(maxsize=1 << 16)
def rouge_tokens(text: str) -> tuple:
    """The tokens ROUGE-L compares: rouge_score's default tokenizer with the Porter stemmer."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    return tuple(_rouge_tokenizer().tokenize(text))


def normalize_answer(text: str) -> str:
    """The official exact-match normalization: lowercase, drop string.punctuation, collapse whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of two sequences.

    O(len(a) * len(b)) time, O(len(b)) memory. Row i of the dynamic program holds L(a[:i], b[:j]) for every j:
    L(i, j) = L(i-1, j-1) + 1 if a[i-1] == b[j-1] else max(L(i-1, j), L(i, j-1)).
    """
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            if x == y:
                row.append(prev[j] + 1)
            else:
                row.append(max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def _references(references) -> list:
    if isinstance(references, str):  # a single reference
        references = [references]
    else:
        references = list(references)
    if not references:
        raise ValueError("at least one reference is needed")
    return references


def rouge_l(prediction: str, references) -> float:
    """ROUGE-L F-measure x100 of ``prediction``, the max over ``references`` (a str or a list of str)."""
    pred = rouge_tokens(prediction)
    best = 0.0
    for reference in _references(references):
        ref = rouge_tokens(reference)
        common = lcs_length(pred, ref)
        if common:  # else F = 0 (also when either side has no token)
            precision = common / len(pred)
            recall = common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return 100.0 * best


def exact_match(prediction: str, references) -> float:
    """100.0 if the normalized prediction equals some normalized reference, else 0.0."""
    pred = normalize_answer(prediction)
    if any(pred == normalize_answer(ref) for ref in _references(references)):
        return 100.0
    return 0.0


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood per counted token, in nats); inf when that overflows."""
    mean_nll = float(mean_nll)
    if math.isnan(mean_nll) or mean_nll < 0:
        raise ValueError(f"mean_nll must be a non-negative number, got {mean_nll}")
    if mean_nll >= 709.0:  # exp overflows a float64 just above 709.78
        return math.inf
    return math.exp(mean_nll)


def _flat(values, what):
    values = np.asarray(list(values), dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{what} needs a non-empty flat list of numbers")
    return values


def mean_se(values) -> tuple[float, float, int]:
    """(mean, standard error s / sqrt(n) with s the n-1 sample deviation, n); the error is NaN for n = 1."""
    values = _flat(values, "mean_se")
    if values.size > 1:
        se = float(values.std(ddof=1) / math.sqrt(values.size))
    else:  # no spread from one value
        se = math.nan
    return float(values.mean()), se, int(values.size)


def t_quantile(df: int, p: float = 0.975) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with ``df`` degrees of freedom, by bisection on its CDF.

    With theta = atan(t / sqrt(df)), P(|T| < t) has a finite closed form (Abramowitz & Stegun 26.7.3-4):
    df odd:  (2/pi) (theta + sin(theta) sum_{k=0}^{(df-3)/2} c_k cos(theta)^(2k+1)),
             c_0 = 1, c_k = c_{k-1} (2k) / (2k+1);
    df even: sin(theta) sum_{k=0}^{(df-2)/2} c_k cos(theta)^(2k), c_0 = 1, c_k = c_{k-1} (2k-1) / (2k).
    """
    if int(df) != df or df < 1 or not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs an integer df >= 1 and p in (0.5, 1), got df={df}, p={p}")

    def two_sided(t):  # P(|T| < t)
        theta = math.atan(t / math.sqrt(df))
        c = math.cos(theta)
        if df % 2 == 1:  # the sum over k = 0 .. (df-3)/2 (empty for df = 1)
            term = c
            total = term if df > 1 else 0.0
            for k in range(1, (df - 1) // 2):
                term *= c * c * ((2 * k) / (2 * k + 1))
                total += term
            return 2 / math.pi * (theta + math.sin(theta) * total)
        term = 1.0  # df even: the sum over k = 0 .. (df-2)/2
        total = term
        for k in range(1, df // 2):
            term *= c * c * ((2 * k - 1) / (2 * k))
            total += term
        return math.sin(theta) * total

    target = 2 * p - 1  # P(|T| < t) at the p-quantile t
    lo = 0.0
    hi = 1.0
    while two_sided(hi) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if two_sided(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def paired_difference(a, b) -> dict:
    """Mean of a_i - b_i over paired seeds with its Student-t 95% interval (None for a single pair)."""
    a = _flat(a, "paired_difference")
    b = _flat(b, "paired_difference")
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs as many values on each side, got {a.size} and {b.size}")
    mean, se, n = mean_se(a - b)
    ci95 = None
    if n > 1:
        half = t_quantile(n - 1) * se
        ci95 = [mean - half, mean + half]
    return {"mean": mean, "ci95": ci95, "n": n, "per_seed": (a - b).tolist()}
