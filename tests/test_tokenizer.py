"""Byte-level BPE: exact round trip, determinism, save/load, fingerprint."""

import json
import os
import re
import subprocess
import sys

import pytest

from minitodi.tokenizer import EOS, TRAINING_WORD_CHARS, Tokenizer, cut_long_words

TEXTS = [
    "The cat sat on the mat. The dog sat on the log.",
    "def f(x):\n    return x + 1\n",
    "Name a fruit that starts with the letter b.\nbanana",
] * 20

ODD_TEXTS = [
    "",
    " leading and trailing spaces ",
    "tabs\tand\r\nwindows newlines\n\n",
    "accents: héllo wörld, ñandú, Ærøskøbing",
    "CJK 日本語のテキスト, emoji 🎉👩‍👩‍👧 and a combining e\u0301",
    "control \x00\x01\x7f and the replacement char \ufffd",
    f"an {EOS} in the middle",
]


@pytest.fixture(scope="module")
def texts_tokenizer():
    """A byte-level BPE of 300 tokens trained on TEXTS."""
    return Tokenizer.train(TEXTS, 300)


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip_is_exact(texts_tokenizer, text):
    ids = texts_tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < texts_tokenizer.vocab_size for i in ids)
    assert texts_tokenizer.decode(ids) == text


def test_merges_shorten_seen_text_and_eos_is_one_token(texts_tokenizer):
    text = "The cat sat on the mat."
    assert len(texts_tokenizer.encode(text)) < len(text.encode("utf-8"))
    assert texts_tokenizer.encode(EOS) == [texts_tokenizer.eos_id]
    assert texts_tokenizer.decode([texts_tokenizer.eos_id]) == EOS
    assert texts_tokenizer.vocab_size == 300


def test_training_is_deterministic_across_processes_and_thread_counts(tmp_path, texts_tokenizer):
    """A fresh process with one worker thread must write the same bytes as this one."""
    texts_tokenizer.save(tmp_path / "here")
    script = (
        "import sys; from minitodi.tokenizer import Tokenizer; "
        "from tests.test_tokenizer import TEXTS; Tokenizer.train(TEXTS, 300).save(sys.argv[1])"
    )
    env = dict(os.environ, RAYON_NUM_THREADS="1", PYTHONHASHSEED="123")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "there")], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(__file__)))
    here = (tmp_path / "here" / "tokenizer.json").read_bytes()
    there = (tmp_path / "there" / "tokenizer.json").read_bytes()
    assert here == there


def test_save_load_keeps_ids_and_fingerprint(tmp_path, texts_tokenizer):
    path = texts_tokenizer.save(tmp_path / "tk")
    for where in (tmp_path / "tk", path):
        back = Tokenizer.load(where)
        assert back.fingerprint() == texts_tokenizer.fingerprint()
        assert back.eos_id == texts_tokenizer.eos_id and back.vocab_size == texts_tokenizer.vocab_size
        assert back.encode(TEXTS[0]) == texts_tokenizer.encode(TEXTS[0])


def test_fingerprint_tells_tokenizers_apart(texts_tokenizer):
    other = Tokenizer.train(TEXTS, 280)
    assert other.fingerprint() != texts_tokenizer.fingerprint()
    assert len(texts_tokenizer.fingerprint()) == 64


def test_bad_inputs_are_clear_errors(tmp_path, texts_tokenizer):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(TEXTS, 100)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        Tokenizer.train(["ok", 3], 300)
    with pytest.raises(ValueError, match="out of range"):
        texts_tokenizer.decode([texts_tokenizer.vocab_size])
    with pytest.raises(TypeError, match="expects str"):
        texts_tokenizer.encode(b"bytes")
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing")


def test_a_write_cut_short_keeps_the_old_file(tmp_path, texts_tokenizer):
    """Saving under a file-size limit (``ulimit -f 6``: 6 KiB): the write fails, the old file stays whole."""
    limit = 6 << 10
    old = Tokenizer.train(TEXTS, 257).save(tmp_path)
    old_bytes = old.read_bytes()
    assert len(texts_tokenizer._tok.to_str(pretty=True)) > limit > len(old_bytes)
    new = tmp_path / "new.json"
    new.write_text(texts_tokenizer._tok.to_str())
    save = ("import resource, sys; from minitodi.tokenizer import Tokenizer; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "Tokenizer.load(sys.argv[1]).save(sys.argv[2])")
    done = subprocess.run([sys.executable, "-c", save, str(new), str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 1 and "File too large (writing" in done.stderr
    assert old.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "tokenizer.json"]


def test_an_unchanged_tokenizer_is_not_rewritten(tmp_path, texts_tokenizer):
    path = texts_tokenizer.save(tmp_path)
    os.utime(path, ns=(10**18, 10**18))
    assert Tokenizer.load(path).save(tmp_path) == path
    assert path.stat().st_mtime_ns == 10**18


@pytest.mark.parametrize("content, message", [
    (b"", "not a tokenizer tokenizers can read: EOF"),
    (b'{"model": ', "not a tokenizer tokenizers can read: EOF"),
    (b"\xff\xfe{}", "not a tokenizer: not UTF-8 text"),
    (b"[]", "not a tokenizer tokenizers can read"),
])
def test_a_malformed_file_is_a_value_error_naming_it(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path} is {message}"):
        Tokenizer.load(path)


def test_a_tokenizer_without_the_end_of_text_token_is_named(tmp_path, texts_tokenizer):
    tokenizer = json.loads(texts_tokenizer._tok.to_str())
    tokenizer["added_tokens"] = []
    del tokenizer["model"]["vocab"][EOS]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match=re.escape(f"{path}: the tokenizer has no '{EOS}' token")):
        Tokenizer.load(path)


def test_bpe_training_cuts_a_huge_word_into_pieces_and_leaves_ordinary_text_alone():
    """A 2 MB word took the trainer most of an hour (time grows with a word's length squared)."""
    text = "a b " + "x" * (2 * TRAINING_WORD_CHARS + 500) + " end"
    assert [len(w) for w in cut_long_words(text).split(" ")] == [1, 1, 1000, 1000, 500, 3]
    ordinary = "def f(x):\n    return x * 2  # " + "y" * TRAINING_WORD_CHARS
    assert cut_long_words(ordinary) == ordinary  # a word of exactly the limit is not cut
    huge = "z" * 2_000_000
    tok = Tokenizer.train(["hello world " * 50, huge], 300)  # seconds, not an hour
    assert tok.decode(tok.encode(huge)) == huge  # the trained tokenizer still encodes the whole word
