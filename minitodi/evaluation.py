"""Evaluation over held-out records: generated answers scored with ROUGE-L and exact match, the
teacher-forced perplexity of the responses, and the divergence from a teacher."""

import numpy as np

from . import layers, losses, metrics
from .backend import to_float
from .data import eval_batches, format_prompt
from .generate import generate
from .model import forward


def heldout_losses(params, config, examples, pad_id, *, batch_size=64, device="cpu", teacher=None):
    """Per counted token over ``examples`` (token-weighted, not batch-weighted): the cross-entropy, and
    KL(teacher || model) at T = 1 when a teacher is given (else None). ``pad_id`` is the tokenizer's eos
    id; padding follows every counted token, so causal attention never lets it change a counted one."""
    nll = kl = count = 0.0
    for idx, labels in eval_batches(examples, batch_size, pad_id=pad_id, device=device):
        logits, _ = forward(params, idx, config)
        ce, cache = layers.cross_entropy_forward(logits, labels)
        n = cache[3]
        nll += to_float(ce) * n
        if teacher is not None:
            kl += losses.fkl(logits, teacher.logits(idx), labels != layers.IGNORE_INDEX, temperature=1.0)[0] * n
        count += n
    return nll / count, (None if teacher is None else kl / count)


def prompt_ids(tokenizer, record, room):
    """The prompt's token ids, cut from the left to at most ``room`` tokens."""
    ids = tokenizer.encode(format_prompt(record))
    return ids[-room:]


def evaluate(params, config, tokenizer, records, examples, *, teacher=None, max_new_tokens=24,
             batch_size=64, device="cpu"):
    """Every metric of a model on held-out records (greedy generation) and their encoded examples.

    Returns ``{"rouge_l", "exact_match", "perplexity", "divergence", "per_task", "samples"}``: ROUGE-L and
    exact match (x100, max over each record's references) of greedy completions; perplexity of the
    responses (teacher-forced); ``divergence`` = KL(teacher || model) per response token at T = 1 (None
    without a teacher); ``per_task`` ROUGE-L and exact match per task family; ``samples`` a few completions.
    """
    room = config.n_positions - max_new_tokens
    prompts = [prompt_ids(tokenizer, r, room) for r in records]
    outputs = generate(params, config, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                       batch_size=batch_size)
    texts = [tokenizer.decode(ids) for ids in outputs]
    rouge = [metrics.rouge_l(t, r["references"]) for t, r in zip(texts, records)]
    exact = [metrics.exact_match(t, r["references"]) for t, r in zip(texts, records)]
    per_task = {}
    for task in sorted({r["task"] for r in records}):
        rows = [i for i, r in enumerate(records) if r["task"] == task]
        per_task[task] = {"rouge_l": float(np.mean([rouge[i] for i in rows])),
                          "exact_match": float(np.mean([exact[i] for i in rows]))}
    nll, kl = heldout_losses(params, config, examples, tokenizer.eos_id, batch_size=batch_size, device=device,
                             teacher=teacher)
    return {"rouge_l": float(np.mean(rouge)), "exact_match": float(np.mean(exact)),
            "perplexity": metrics.perplexity(nll), "divergence": kl,
            "per_task": per_task,
            "samples": [{"prompt": format_prompt(r), "output": t, "references": r["references"]}
                        for r, t in list(zip(records, texts))[:5]]}
