"""Byte-level BPE, trained with the ``tokenizers`` library, behind a small class.

Why byte-level: every string is first turned into its UTF-8 bytes, and all 256 bytes are in the
vocabulary from the start (``initial_alphabet``), so *any* unicode text encodes, and
``decode(encode(text)) == text`` exactly. No normalizer runs (no NFC, no lowercasing, no stripping) and
no prefix space is added, so nothing is lost on the way in. BPE merges, learned from the training texts,
then join frequent byte pairs into bigger tokens.

One special token, ``<|endoftext|>`` (:data:`EOS`), ends every example and also serves as padding: padded
positions get label -100, so losses never see them (see ``data``). The literal string ``<|endoftext|>``
inside a text is encoded as that token (as GPT-2's tokenizer does with special tokens allowed); the round
trip still holds because decoding keeps special tokens.

Training is deterministic: the same texts and vocabulary size give a byte-identical ``tokenizer.json``
(a test checks it). :meth:`Tokenizer.fingerprint` hashes the canonical JSON, so a trainer can refuse to
distil between a teacher and a student whose tokenizers differ.
"""

import hashlib
import json
import re
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from . import checkpoint

EOS = "<|endoftext|>"
FILENAME = "tokenizer.json"
MIN_VOCAB_SIZE = 257  # 256 bytes + the end-of-text token
# For BPE's training only, a run of non-space characters longer than this is cut into pieces of this length:
# the trainer's time grows with the square of a word's length (a word of 20,000 characters took 0.22 s,
# 50,000 took 1.4 s, so one of 2 MB would take most of an hour). No word of ordinary text comes near it,
# so their merges are learned exactly as before; the trained tokenizer still encodes the whole word.
TRAINING_WORD_CHARS = 1000
_LONG_WORD_PIECE = re.compile(rf"(\S{{{TRAINING_WORD_CHARS}}})(?=\S)")  # a full piece with more to follow


def cut_long_words(text):
    """``text`` with a space after every :data:`TRAINING_WORD_CHARS` characters of a longer word."""
    return _LONG_WORD_PIECE.sub(r"\1 ", text)


class Tokenizer:
    """A byte-level BPE tokenizer with one end-of-text token.

    Build one with :meth:`train` or :meth:`load`; the constructor wraps an existing
    ``tokenizers.Tokenizer`` that already contains :data:`EOS`.
    """

    def __init__(self, hf_tokenizer: _HFTokenizer):
        eos_id = hf_tokenizer.token_to_id(EOS)
        if eos_id is None:
            raise ValueError(f"the tokenizer has no {EOS!r} token")
        self._tok = hf_tokenizer
        self.eos_id: int = eos_id
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.path = None  # the tokenizer.json it was read from (set by load); None: made in this process

    @classmethod
    def train(cls, texts, vocab_size: int) -> "Tokenizer":
        """Learn BPE merges from ``texts`` (an iterable of str) up to ``vocab_size`` tokens in all.

        The vocabulary holds the end-of-text token (id 0), the 256 bytes, then merges in the order
        learned; it can end up smaller than ``vocab_size`` when the texts offer no more pairs to merge.
        """
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + {EOS}), "
                             f"got {vocab_size!r}")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((cut_long_words(text) for text in texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read ``tokenizer.json``: ``path`` is the file or the directory holding it.

        A file that is not a tokenizer (empty, cut short, not UTF-8, not JSON, a bad merge, no end-of-text
        token) is a ValueError naming it.
        """
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a tokenizer: not UTF-8 text") from None
        try:
            hf_tokenizer = _HFTokenizer.from_str(text)
        except Exception as err:  # tokenizers raises a bare Exception for every malformed file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path} is not a tokenizer tokenizers can read: {reason}") from None
        try:
            tokenizer = cls(hf_tokenizer)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        tokenizer.path = path
        return tokenizer

    @classmethod
    def load_for_model(cls, directory) -> "Tokenizer":
        """The tokenizer.json of a model's directory, checked to be the one the model was trained with.

        minitodi records the tokenizer's fingerprint in the model's config.json and model file
        (:func:`minitodi.checkpoint.recorded_tokenizers`); a tokenizer.json from another run beside them (a
        run stopped, a file copied) would encode text into ids the model never learned, silently.
        """
        directory = Path(directory)
        tokenizer = cls.load(directory)
        for path, recorded in checkpoint.recorded_tokenizers(directory).items():
            if recorded != tokenizer.fingerprint():
                raise ValueError(f"{directory / FILENAME} is not the tokenizer the model in {path} was "
                                 f"trained with (fingerprint {tokenizer.fingerprint()[:12]}, {path.name} "
                                 f"records {recorded[:12]}): the two files come from different runs")
        return tokenizer

    def save(self, directory) -> Path:
        """Write ``directory/tokenizer.json`` (creating the directory) and return the file's path.

        The write is atomic (a temporary file renamed into place: cut short, it leaves the old file), and
        a file that already holds this tokenizer is not rewritten.
        """
        path = Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text(path, self._tok.to_str(pretty=True))
        return path

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-text token is appended)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """The text of ``ids`` (ints in [0, vocab_size)); the end-of-text token decodes to its literal.

        A cut through a multi-byte character (e.g. decoding a prefix of a sequence) gives U+FFFD there.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._tok.decode(ids, skip_special_tokens=False)

    def fingerprint(self) -> str:
        """sha256 (hex) of the tokenizer's canonical JSON (keys sorted, no whitespace)."""
        content = json.loads(self._tok.to_str())
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        fingerprint = self.fingerprint()[:12]
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, fingerprint={fingerprint})"
