"""The evaluation protocol: the paper's settings, sampled passes averaged, validity and coverage."""

import numpy as np
import pytest

from minitodi import data, evaluation, metrics
from minitodi.core.model import GPTConfig, init_params
from minitodi.evaluation import PAPER, Protocol, evaluate, validity_and_coverage
from minitodi.generate import generate


@pytest.fixture(scope="module")
def random_gpt2(small_suite_tokenizer):
    """(config, params): an untrained one-layer GPT-2 over the small suite's tokenizer, float32."""
    cfg = GPTConfig(vocab_size=small_suite_tokenizer.vocab_size, n_positions=40, n_embd=16, n_layer=1,
                    n_head=2)
    params = init_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    for x in params.values():  # a sharper next-token law than at init: samples repeat and differ
        x += 0.2 * rng.standard_normal(x.shape).astype(x.dtype)
    return cfg, params


def test_the_default_is_the_papers_protocol():
    assert PAPER.to_dict() == {"decoding": "sample", "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                               "no_repeat_ngram_size": 6, "eval_seeds": [10, 20, 30, 40, 50],
                               "rouge": evaluation.ROUGE}
    assert [seed for seed, _ in PAPER.runs()] == [10, 20, 30, 40, 50]
    assert Protocol(decoding="greedy").runs() == [(0, {"temperature": 0.0, "no_repeat_ngram_size": 6})]


@pytest.mark.parametrize("settings, message", [
    ({"decoding": "beam"}, "decoding must be 'sample' or 'greedy'"),
    ({"eval_seeds": ()}, "eval_seeds must be distinct integers"),
    ({"eval_seeds": (1, 1)}, "eval_seeds must be distinct integers"),
    ({"eval_seeds": (-1,)}, "eval_seeds must be distinct integers"),
    ({"temperature": float("nan")}, "temperature"),
    ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size"),
])
def test_bad_protocols_are_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        Protocol(**settings)


def test_numpy_seeds_are_welcome_and_stored_as_ints():
    """np.arange's seeds were refused as 'not integers'; stored as ints, the protocol writes as JSON."""
    import json

    protocol = Protocol(eval_seeds=np.arange(10, 40, 10))
    assert protocol.eval_seeds == (10, 20, 30) and all(type(s) is int for s in protocol.eval_seeds)
    assert json.loads(json.dumps(protocol.to_dict()))["eval_seeds"] == [10, 20, 30]
    with pytest.raises(ValueError, match="eval_seeds must be distinct integers"):
        Protocol(eval_seeds=(True, 2))


def test_scores_are_the_mean_over_records_and_sampled_passes(small_suite, small_suite_tokenizer, random_gpt2):
    records, tok = small_suite["test"], small_suite_tokenizer
    cfg, params = random_gpt2
    ex = data.instruction_examples(records, tok, 32)
    prompts = [tok.encode(data.format_prompt(r))[-(cfg.n_positions - 6):] for r in records]
    settings = {"max_new_tokens": 6, "eos_id": tok.eos_id, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                "no_repeat_ngram_size": 6}
    # references a random model can meet: its own pass-10 answer, and a word
    answers = [tok.decode(o) for o in generate(params, cfg, prompts, seed=10, **settings)]
    records = [{**r, "references": [a, "cat"]} for r, a in zip(records, answers)]
    result = evaluate(params, cfg, tok, records, ex, protocol=Protocol(eval_seeds=(10, 20, 30)),
                      max_new_tokens=6)
    per_seed = []
    for seed in (10, 20, 30):  # the definition, pass by pass
        out = generate(params, cfg, prompts, seed=seed, **settings)
        per_seed.append([metrics.rouge_l(tok.decode(o), r["references"]) for o, r in zip(out, records)])
    per_seed = np.array(per_seed)
    assert len({tuple(row) for row in per_seed}) > 1  # the passes differ: sampling, not one answer copied
    assert result["rouge_l_per_eval_seed"] == pytest.approx(per_seed.mean(axis=1).tolist(), rel=1e-12)
    assert result["rouge_l"] == pytest.approx(per_seed.mean(), rel=1e-12)
    assert result["rouge_l_se"] == pytest.approx(per_seed.mean(axis=1).std(ddof=1) / np.sqrt(3), rel=1e-9)
    greedy = evaluate(params, cfg, tok, records, ex, protocol=Protocol(decoding="greedy"),
                      max_new_tokens=6)
    assert greedy["rouge_l_se"] is None and len(greedy["rouge_l_per_eval_seed"]) == 1


def test_validity_and_coverage_hand_worked():
    records = [{"references": ["red", "blue", "green", "Pink"]},  # multi-answer
               {"references": ["one"]}]                           # single answer: not counted
    texts = [["Red.", "zero"], ["blue", "one"], ["red", "one"], ["purple", "one"]]  # 4 passes
    # record 0: valid samples red, blue, red (3 of 4) -> validity 75; distinct valid {red, blue} of 4 -> 50
    assert validity_and_coverage(texts, records) == (75.0, 50.0)
    assert validity_and_coverage(texts, [records[1], records[1]]) == (None, None)
    # two multi-answer records: the means over records
    records = [records[0], {"references": ["a", "b"]}]
    # record 0: 2/2 valid, 1/4 reached; record 1: 1/2 valid, 1/2 reached
    texts = [["pink", "a"], ["pink", "c"]]
    assert validity_and_coverage(texts, records) == pytest.approx(((100 + 50) / 2, (25 + 50) / 2))


def test_several_references_in_a_users_jsonl_all_count(small_suite_tokenizer, random_gpt2, tmp_path,
                                                       monkeypatch):
    tok = small_suite_tokenizer
    cfg, params = random_gpt2
    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "Name a pet.", "response": "dog", "references": ["dog", "cat"]}\n'
                    '{"instruction": "Name a pet.", "input": "not a dog", "output": ["cat", "hamster"]}\n'
                    '{"instruction": "Say hi.", "input": "", "output": "hello"}\n')
    records = data.load_jsonl(path)
    assert [(r["context"], r["response"], r["references"]) for r in records] == [
        ("", "dog", ["dog", "cat"]), ("not a dog", "cat", ["cat", "hamster"]), ("", "hello", ["hello"])]

    def always_cat(params, config, prompts, **settings):
        return [tok.encode("cat")] * len(prompts)

    monkeypatch.setattr(evaluation, "generate", always_cat)
    ex = data.instruction_examples(records, tok, 32)
    result = evaluate(params, cfg, tok, records, ex, max_new_tokens=6)
    # "cat" is the second reference of the first record
    assert result["exact_match"] == pytest.approx(200 / 3)
    # 1 of 2 answers on both multi-answer records
    assert result["validity"] == 100.0 and result["coverage"] == 50.0
