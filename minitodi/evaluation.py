"""The paper's evaluation protocol over held-out records, and the teacher-forced losses.

**Protocol** (the ToDi repository's ``scripts/eval``, inherited from MiniLLM): answers are *sampled* at
temperature 1, top_k 0 (off), top_p 1 (off), ``no_repeat_ngram_size`` 6, once for each generation seed 10,
20, 30, 40, 50; every score is the mean over records and seeds. ``Protocol(decoding="greedy")`` decodes
once with the argmax instead. Scores (see :mod:`minitodi.metrics`): ROUGE-L and exact match, x100, max over
each record's references.

**Validity and coverage** (on multi-answer records, those with >= 2 references; on the built-in suite their
references are every valid answer): validity = the share of sampled answers that are valid (exact match
with some reference); coverage = per record, the share of its distinct valid answers that its samples
reach, averaged. A mode-seeking student (RKL) keeps validity high and coverage low; a mode-covering one
(FKL) spreads its samples, reaching more answers and more invalid ones. Both are percentages.

**Teacher-forced** numbers: the perplexity of the reference responses, and KL(teacher || model) per response
token at T = 1.
"""

import numbers
from dataclasses import asdict, dataclass

import numpy as np

from . import metrics
from .core import layers
from .core.device import to_float
from .data import eval_batches, format_prompt
from .generate import check_settings, generate
from .parallel import forward_in_shards, loss_and_grad

ROUGE = "rouge_score RougeScorer(['rougeL'], use_stemmer=True) F-measure, max over references, x100"


@dataclass(frozen=True)
class Protocol:
    """How answers are generated; the defaults are the paper's. Greedy decoding ignores the seeds."""

    decoding: str = "sample"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 6
    eval_seeds: tuple = (10, 20, 30, 40, 50)

    def __post_init__(self):
        if self.decoding not in ("sample", "greedy"):
            raise ValueError(f"decoding must be 'sample' or 'greedy', got {self.decoding!r}")
        check_settings(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       no_repeat_ngram_size=self.no_repeat_ngram_size)
        seeds = list(self.eval_seeds)
        distinct = len(set(seeds)) == len(seeds)
        integers = all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seeds)
        if not seeds or not distinct or not integers or any(s < 0 for s in seeds):
            raise ValueError(f"eval_seeds must be distinct integers >= 0, at least one, got {seeds}")
        # NumPy integers (np.arange) are welcome, stored as ints: results.json writes them as JSON
        object.__setattr__(self, "eval_seeds", tuple(int(s) for s in seeds))

    def to_dict(self):
        return {**asdict(self), "eval_seeds": list(self.eval_seeds), "rouge": ROUGE}

    def runs(self):
        """(seed, generate's decoding keywords) for every generation pass."""
        if self.decoding == "greedy":  # one pass; the seed is not used
            return [(0, {"temperature": 0.0, "no_repeat_ngram_size": self.no_repeat_ngram_size})]
        sampling = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                    "no_repeat_ngram_size": self.no_repeat_ngram_size}
        return [(seed, dict(sampling)) for seed in self.eval_seeds]


PAPER = Protocol()


def heldout_losses(params, config, examples, pad_id, *, batch_size=64, device="cpu", teacher=None):
    """``(cross-entropy, KL(teacher || model))`` per counted token over ``examples``.

    Both are token-weighted, not batch-weighted; the KL is at T = 1, and None without a teacher.
    ``pad_id`` is the tokenizer's eos id; padding follows every counted token, so causal attention never
    lets it change a counted one (the batch contract of :mod:`minitodi.data`).
    """
    nll = 0.0
    kl = 0.0
    count = 0.0
    for idx, labels in eval_batches(examples, batch_size, pad_id=pad_id, device=device):
        counted = labels != layers.IGNORE_INDEX
        logits, _ = forward_in_shards(params, idx, config, rows=counted)  # (n, V) at the counted positions
        ce, cache = layers.cross_entropy_forward(logits, labels[counted])
        n = cache[3]  # the number of counted tokens in the batch
        nll += to_float(ce) * n
        if teacher is not None:
            divergence, _ = loss_and_grad("fkl", logits, teacher.logits(idx, counted), temperature=1.0)
            kl += divergence * n
        count += n
    if teacher is None:
        return nll / count, None
    return nll / count, kl / count


def prompt_ids(tokenizer, record, room):
    """The prompt's token ids, cut from the left to at most ``room`` tokens."""
    return tokenizer.encode(format_prompt(record))[-room:]


def validity_and_coverage(texts, records):
    """(validity, coverage) in percent over the records with >= 2 references; (None, None) without any.

    ``texts[k][i]`` is the answer of pass k to record i.
    """
    valid = reached = 0.0
    multi = [i for i, r in enumerate(records) if len(r["references"]) > 1]
    for i in multi:
        answers = {metrics.normalize_answer(ref) for ref in records[i]["references"]}
        samples = [metrics.normalize_answer(run[i]) for run in texts]
        valid += sum(s in answers for s in samples) / len(samples)
        reached += len(answers.intersection(samples)) / len(answers)
    if not multi:
        return None, None
    return 100 * valid / len(multi), 100 * reached / len(multi)


def evaluate(params, config, tokenizer, records, examples, *, teacher=None, protocol=PAPER, max_new_tokens=24,
             batch_size=64, device="cpu"):
    """Every metric of a model on held-out records (answers generated under ``protocol``) and their examples.

    Returns ``{"rouge_l", "rouge_l_se", "exact_match", "validity", "coverage", "perplexity", "divergence",
    "rouge_l_per_eval_seed", "per_task", "samples"}``: means over records and generation passes;
    ``rouge_l_se`` the standard error over the passes (None for one); ``divergence`` KL(teacher || model)
    per response token at T = 1 (None without a teacher); ``per_task`` ROUGE-L and exact match per task
    family; ``samples`` the first pass's answers to the first five records.
    """
    room = config.n_positions - max_new_tokens
    prompts = [prompt_ids(tokenizer, r, room) for r in records]
    texts = []  # texts[k][i]: the answer of pass k to record i
    for seed, decoding in protocol.runs():
        outputs = generate(params, config, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                           seed=seed, batch_size=batch_size, **decoding)
        texts.append([tokenizer.decode(ids) for ids in outputs])
    rouge = _scores(metrics.rouge_l, texts, records)  # (passes, records)
    exact = _scores(metrics.exact_match, texts, records)
    per_task = {}
    for task in sorted({r["task"] for r in records}):
        rows = [i for i, r in enumerate(records) if r["task"] == task]
        per_task[task] = {"rouge_l": float(rouge[:, rows].mean()),
                          "exact_match": float(exact[:, rows].mean())}
    nll, kl = heldout_losses(params, config, examples, tokenizer.eos_id, batch_size=batch_size, device=device,
                             teacher=teacher)
    _, se, _ = metrics.mean_se(rouge.mean(axis=1))
    if np.isnan(se):  # a single pass has no spread
        se = None
    validity, coverage = validity_and_coverage(texts, records)
    samples = []
    for record, text in list(zip(records, texts[0]))[:5]:
        samples.append({"prompt": format_prompt(record), "output": text, "references": record["references"]})
    return {
        "rouge_l": float(rouge.mean()),
        "rouge_l_se": se,
        "exact_match": float(exact.mean()),
        "validity": validity,
        "coverage": coverage,
        "perplexity": metrics.perplexity(nll),
        "divergence": kl,
        "rouge_l_per_eval_seed": rouge.mean(axis=1).tolist(),
        "per_task": per_task,
        "samples": samples,
    }


def _scores(metric, texts, records):
    """``metric(answer, references)`` for every pass and record, as an array (passes, records)."""
    return np.array([[metric(text, record["references"]) for text, record in zip(run, records)]
                     for run in texts])
