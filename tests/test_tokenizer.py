"""Byte-level BPE: exact round trip, determinism, save/load, fingerprint."""

import os
import subprocess
import sys

import pytest

from minitodi.tokenizer import EOS, Tokenizer

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
