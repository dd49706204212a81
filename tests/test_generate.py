"""Generation: the KV cache changes nothing, batching changes nothing, sampling draws from the right law."""

import numpy as np
import pytest

from minitodi import checkpoint
from minitodi.core.model import GPTConfig, forward, init_params
from minitodi.generate import check_settings, generate, next_token

CFG = GPTConfig(vocab_size=23, n_positions=24, n_embd=16, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, seed=3, dtype=np.float64)
    rng = np.random.default_rng(0)
    for x in p.values():  # larger weights: a sharper, less uniform next-token distribution
        x += 0.3 * rng.standard_normal(x.shape)
    return p


def greedy_without_cache(params, prompt, n, eos_id=None):
    """The definition: run the whole sequence again for every new token."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits, _ = forward(params, np.array([seq]), CFG)
        token = int(np.argmax(logits[0, -1]))
        if token == eos_id:
            break
        out.append(token)
        seq.append(token)
    return out


def test_kv_cache_greedy_equals_recomputing_everything(params):
    prompt = [1, 5, 7, 2]
    assert generate(params, CFG, [prompt], max_new_tokens=12) == [greedy_without_cache(params, prompt, 12)]


def test_batched_prompts_of_mixed_lengths_equal_one_at_a_time(params):
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8], [9], [3, 3, 3, 3, 3]]
    together = generate(params, CFG, prompts, max_new_tokens=8, batch_size=2)
    alone = [generate(params, CFG, [p], max_new_tokens=8)[0] for p in prompts]
    assert together == alone
    assert all(len(out) == 8 for out in together)  # no eos given: every row runs to the limit


def test_stops_at_eos_and_leaves_it_out(params):
    prompt = [1, 5, 7, 2]
    full = greedy_without_cache(params, prompt, 12)
    eos = full[3]  # make the fourth greedy token the end of text
    out = generate(params, CFG, [prompt], max_new_tokens=12, eos_id=eos)[0]
    assert out == full[:full.index(eos)]
    assert eos not in out


def test_long_prompts_are_cut_and_the_context_end_is_said(params, capsys):
    # 50 new tokens asked of a 24-position context: the continuation is promised R = 24 // 2 = 12 positions,
    # so the 20-token prompt keeps its last 24 - 12 + 1 = 13 tokens and 12 tokens come out
    prompt = list(range(1, 21))
    out = generate(params, CFG, [prompt], max_new_tokens=50)[0]
    assert out == greedy_without_cache(params, prompt[-13:], 12)
    err = capsys.readouterr().err
    assert "1 prompt(s) cut from the left by up to 7 tokens" in err
    assert "stopped at the end of the context (24 positions)" in err
    short = generate(params, CFG, [prompt[:4]], max_new_tokens=12)[0]
    assert short == greedy_without_cache(params, prompt[:4], 12)
    assert capsys.readouterr().err == ""  # 4 + 12 - 1 <= 24: nothing to say


def test_top_k_1_and_tiny_top_p_are_greedy(params):
    prompt = [[2, 4, 6]]
    greedy = generate(params, CFG, prompt, max_new_tokens=10)
    assert generate(params, CFG, prompt, max_new_tokens=10, temperature=1.0, top_k=1, seed=5) == greedy
    assert generate(params, CFG, prompt, max_new_tokens=10, temperature=1.0, top_p=1e-9, seed=5) == greedy


def test_sampling_is_reproducible_and_depends_on_the_seed(params):
    prompts = [[2, 4, 6]] * 4
    a = generate(params, CFG, prompts, max_new_tokens=10, temperature=1.5, seed=1)
    assert a == generate(params, CFG, prompts, max_new_tokens=10, temperature=1.5, seed=1)
    assert a != generate(params, CFG, prompts, max_new_tokens=10, temperature=1.5, seed=2)


def test_a_sample_does_not_depend_on_the_batch(params):
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [2, 2]]
    settings = {"max_new_tokens": 10, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "no_repeat_ngram_size": 2,
                "seed": 4}
    together = generate(params, CFG, prompts, batch_size=64, **settings)
    assert together == generate(params, CFG, prompts, batch_size=1, **settings)
    # prompt i draws from the random stream (seed, i), whichever prompts come with it
    assert together[:3] == generate(params, CFG, prompts[:3], **settings)


def test_sampled_frequencies_follow_softmax_over_temperature():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]])) * 2.0  # softmax(logits / 2) = the list above
    rng = np.random.default_rng(0)
    draws = np.concatenate([next_token(np.repeat(logits, 1000, axis=0), rng, temperature=2.0)
                            for _ in range(40)])
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.01)  # 40000 draws: std <= 0.0025


@pytest.mark.parametrize("temperature", [1e-300, 1e-310, 5e-324])
def test_a_tiny_temperature_samples_the_argmax_without_overflow(temperature):
    """z / T overflowed to inf below about 1e-308: every probability nan, token 0 drawn, a warning."""
    logits = np.array([[1.0, 3.0, 2.0, -1.0], [0.5, -2.0, 0.0, 4.0]])
    with np.errstate(over="raise", invalid="raise"):  # underflow to probability 0 is what a tiny T means
        for seed in range(5):
            chosen = next_token(logits, np.random.default_rng(seed), temperature=temperature)
            assert chosen.tolist() == [1, 3]


def test_top_k_and_top_p_cut_the_support():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    many = np.repeat(logits, 4000, axis=0)
    assert set(next_token(many, rng, temperature=1.0, top_k=2)) == {0, 1}
    # top_p = 0.75: 0.5 alone is short of it, 0.5 + 0.3 reaches it, so tokens 0 and 1
    freq = np.bincount(next_token(many, rng, temperature=1.0, top_p=0.75), minlength=4) / 4000
    assert freq[2] == freq[3] == 0
    np.testing.assert_allclose(freq[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


@pytest.mark.parametrize("setting, message", [
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": -5}, "max_new_tokens must be an integer >= 1, got -5"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an integer >= 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
])
def test_bad_settings_are_clear_errors(params, setting, message):
    with pytest.raises(ValueError, match=message):
        generate(params, CFG, [[1, 2]], **setting)


def test_bad_arguments_are_clear(params):
    with pytest.raises(ValueError, match="samples must be an integer >= 1, got 0"):
        check_settings(samples=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(params, CFG, [[1], []])
    with pytest.raises(ValueError, match="token ids must be in"):
        generate(params, CFG, [[1, 99]])
    with pytest.raises(ValueError, match="top_p"):
        next_token(np.zeros((1, 3)), np.random.default_rng(0), temperature=1.0, top_p=0.0)


def test_top_k_0_and_top_p_1_are_off():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    many = np.repeat(logits, 4000, axis=0)
    plain = next_token(many, np.random.default_rng(3), temperature=1.0)
    assert set(plain) == {0, 1, 2, 3}
    both_off = next_token(many, np.random.default_rng(3), temperature=1.0, top_k=0, top_p=1.0)
    np.testing.assert_array_equal(both_off, plain)


def ngram_rule_by_definition(text, n):
    """The tokens that would complete an n-gram already in ``text``, by the definition.

    They are the last tokens of every window whose first n-1 tokens are text's last n-1.
    """
    last = tuple(text[len(text) - n + 1:])
    return {text[i + n - 1] for i in range(len(text) - n + 1) if tuple(text[i:i + n - 1]) == last}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_greedy_never_repeats_and_bans_only_repeats(params, n):
    prompt = [3, 1, 3, 1, 2]
    out = generate(params, CFG, [prompt], max_new_tokens=14, no_repeat_ngram_size=n)[0]
    text = prompt + out
    ngrams = [tuple(text[i:i + n]) for i in range(len(text) - n + 1)]
    generated = ngrams[max(0, len(prompt) - n + 1):]  # the n-grams that end in a new token
    assert all(ngrams.index(g) == len(ngrams) - len(generated) + k for k, g in enumerate(generated))
    # each new token is the argmax over the tokens the rule leaves
    for t in range(len(prompt), len(text)):
        logits, _ = forward(params, np.array([text[:t]]), CFG)
        allowed = [v for v in range(CFG.vocab_size) if v not in ngram_rule_by_definition(text[:t], n)]
        assert text[t] == max(allowed, key=lambda v: logits[0, -1, v])


def test_no_repeat_ngram_matches_transformers_greedy(params, tmp_path, torch, transformers):
    """Greedy decoding with no_repeat_ngram_size gives transformers' tokens for the same float64 GPT-2."""
    checkpoint.save(tmp_path, params, CFG)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64).eval()
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 6):
        for length in (1, 3, 8):
            prompt = rng.integers(0, CFG.vocab_size, size=length).tolist()
            mine = generate(params, CFG, [prompt], max_new_tokens=16, no_repeat_ngram_size=n)[0]
            with torch.no_grad():
                theirs = hf.generate(torch.tensor([prompt]),
                                     attention_mask=torch.ones(1, length, dtype=torch.long),
                                     do_sample=False, num_beams=1, max_new_tokens=16, min_new_tokens=16,
                                     no_repeat_ngram_size=n, eos_token_id=None, pad_token_id=0)
            assert mine == theirs[0, length:].tolist(), (n, prompt)
