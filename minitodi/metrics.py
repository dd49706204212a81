"""Evaluation numbers: ROUGE-L, exact match (validity), perplexity, mean and spread over seeds.

Pure Python and NumPy: generated text is scored on the host.

**Normalization** (the default tokenizer of Google's ``rouge_score``, without a stemmer): lowercase,
turn every run of characters outside ``[a-z0-9]`` into a space, split on whitespace. Only ASCII letters
and digits survive, as in ``rouge_score``; so "Banana!" and "banana" are the same token list.

**ROUGE-L** between a prediction with m tokens and a reference with n tokens, with L the length of their
longest common subsequence (tokens in the same order, not necessarily adjacent):
P = L/m, R = L/n, F = 2PR/(P+R) (0 when L = 0). With several references the score is the maximum of F
over them (the protocol of the ToDi and MiniLLM evaluations), reported x100.

**Exact match** is 100 when the normalized prediction equals a normalized reference, else 0, on the
same 0-100 scale as ROUGE-L so the mean over examples is a percentage. On the synthetic suite, whose
references list every acceptable answer, this is the validity rate.
"""

import math
import re

import numpy as np

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalize_tokens(text: str) -> list[str]:
    """The tokens ROUGE-L compares: lowercase, non-[a-z0-9] runs -> space, split."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)) time, O(len(b)) memory).

    Row i of the dynamic program holds L(a[:i], b[:j]) for every j:
    L(i, j) = L(i-1, j-1) + 1 if a[i-1] == b[j-1] else max(L(i-1, j), L(i, j-1)).
    """
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def _references(references) -> list[str]:
    if isinstance(references, str):
        return [references]
    references = list(references)
    if not references:
        raise ValueError("at least one reference is needed")
    return references


def rouge_l(prediction: str, references) -> float:
    """ROUGE-L F-measure x100 of ``prediction`` against ``references`` (a str or a list of str), max over them."""
    pred = normalize_tokens(prediction)
    best = 0.0
    for ref in _references(references):
        ref = normalize_tokens(ref)
        common = lcs_length(pred, ref)
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return 100.0 * best


def exact_match(prediction: str, references) -> float:
    """100.0 if the normalized prediction equals some normalized reference, else 0.0."""
    pred = normalize_tokens(prediction)
    return 100.0 if any(pred == normalize_tokens(ref) for ref in _references(references)) else 0.0


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood per counted token, in nats); inf when that overflows."""
    mean_nll = float(mean_nll)
    if math.isnan(mean_nll) or mean_nll < 0:
        raise ValueError(f"mean_nll must be a non-negative number, got {mean_nll}")
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def mean_and_spread(values) -> tuple[float, float, int]:
    """(mean, sample standard deviation with n-1 in the denominator, n) of per-seed results.

    The standard deviation is NaN for a single value (a spread needs two seeds).
    """
    values = np.asarray(list(values), dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("mean_and_spread needs a non-empty flat list of numbers")
    std = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return float(values.mean()), std, int(values.size)
