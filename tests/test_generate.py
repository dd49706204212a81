"""Generation: the KV cache changes nothing, batching changes nothing, sampling draws from the right law."""

import numpy as np
import pytest

from minitodi.generate import generate, next_token
from minitodi.model import GPTConfig, forward, init_params

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


def test_stops_at_the_end_of_the_context(params):
    prompt = list(range(1, 21))  # 20 of 24 positions
    out = generate(params, CFG, [prompt], max_new_tokens=50)[0]
    assert len(out) == CFG.n_positions - len(prompt) + 1  # the last token needs no position of its own
    assert out == greedy_without_cache(params, prompt, len(out))


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


def test_sampled_frequencies_follow_softmax_over_temperature():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]])) * 2.0  # softmax(logits / 2) = the list above
    rng = np.random.default_rng(0)
    draws = np.concatenate([next_token(np.repeat(logits, 1000, axis=0), rng, temperature=2.0)
                            for _ in range(40)])
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.01)  # 40000 draws: std <= 0.0025


def test_top_k_and_top_p_cut_the_support():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    many = np.repeat(logits, 4000, axis=0)
    assert set(next_token(many, rng, temperature=1.0, top_k=2)) == {0, 1}
    # top_p = 0.75: 0.5 alone is short of it, 0.5 + 0.3 reaches it, so tokens 0 and 1
    freq = np.bincount(next_token(many, rng, temperature=1.0, top_p=0.75), minlength=4) / 4000
    assert freq[2] == freq[3] == 0
    np.testing.assert_allclose(freq[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


def test_bad_arguments_are_clear(params):
    with pytest.raises(ValueError, match="empty"):
        generate(params, CFG, [[]])
    with pytest.raises(ValueError, match="context"):
        generate(params, CFG, [list(range(1, 23)) * 2])
    with pytest.raises(ValueError, match="token ids must be in"):
        generate(params, CFG, [[1, 99]])
    with pytest.raises(ValueError, match="top_p"):
        next_token(np.zeros((1, 3)), np.random.default_rng(0), temperature=1.0, top_p=0.0)
