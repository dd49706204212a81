"""Data: a synthetic instruction suite, a real-text corpus, the user's files, and batches with -100 labels.

**Records** follow the Dolly format used by the ToDi paper (through MiniLLM's data):
``{"instruction": str, "context": str, "response": str, "references": [str, ...], "task": str}``.
``references`` lists every answer the record accepts (ROUGE-L takes the max over them and exact match
tests membership); ``task`` names the family the record comes from.

**Prompt format** (MiniLLM's Dolly template without its one-sentence preamble, which would only cost a
tiny model context), built by :func:`format_prompt`::

    ### Instruction:
    {instruction}

    ### Input:          <- these two lines and the blank line after them only when context is non-empty
    {context}

    ### Response:
    {response}<|endoftext|>

**Masking.** An example is ``prompt_ids + response_ids + [eos]`` (prompt and response are encoded
separately, exactly as generation will see them: the model is given the prompt's ids and continues).
With ``seq = example``, the model input is ``idx = seq[:-1]`` and ``labels[t] = seq[t + 1]``, the token
that follows ``idx[:t + 1]``; a label is -100 where that target is a prompt token, and padding gets
-100 too. So losses (CE and every divergence) count the response tokens and the final eos only.

**Truncation.** A sequence may hold ``seq_len + 1`` tokens (``seq_len`` inputs). A longer one loses prompt
tokens from the left (its start), keeping at least one prompt token; when even the response and eos do
not fit behind one prompt token, :func:`encode_example` raises (``truncation="error"`` raises as soon as
anything would be cut). A response is never silently shortened or dropped.

**Batches** (:func:`collate`; :class:`BatchIterator` for training, :func:`eval_batches` for evaluation)
are two int64 arrays, NumPy or moved to a device: ``idx`` (B, T) and ``labels`` (B, T), T = the longest
row in the batch (<= seq_len). ``labels`` is -100 wherever a position is not counted: where its target is
a prompt token, and on padding. Shorter rows are right-padded, ``idx`` with the tokenizer's eos id and
``labels`` with -100, so padding always *follows* every counted position of its row. Causal attention
lets position t see only ``idx[:t + 1]``, so padding never changes a counted position's logits: a row's
logits at its counted positions do not depend on what it is batched with. That is why the teacher's logit
cache (:meth:`minitodi.teacher.Teacher.precompute`, filled from batches padded unlike the training ones)
is exact: the same logits a forward pass over the training batch gives, up to the float rounding of a
different batch shape. :class:`BatchIterator` draws batches endlessly from seeded per-epoch permutations;
its position (epoch, offset) is a dict of ints, so a run resumes exactly.

**The language-modelling corpus** (:func:`lm_corpus`) is the text of Python's help topics
(``pydoc_data.topics``, in the standard library: nothing to download). :func:`lm_examples` cuts the token
stream into chunks of ``seq_len + 1`` tokens, every label counted.
"""

import hashlib
import json
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np

from .core.device import to_device
from .core.layers import IGNORE_INDEX
from .tokenizer import MIN_VOCAB_SIZE, Tokenizer

# --------------------------------------------------------------------------------------------------
# the synthetic suite: closed vocabularies

SHORT_WORDS = [
    "cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "bed", "car", "bus", "egg", "fox", "ink", "jam",
    "key", "leg", "net", "owl", "pig", "rug", "toy", "van", "web", "yak", "bird", "fish", "frog", "lamp",
    "milk", "nest", "rain", "rose", "ship", "star", "tree", "wind", "book", "door", "gold", "hill", "kite",
    "lion", "moon", "road", "sand", "snow", "song", "wolf", "cake", "desk",
]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
FRUITS = [
    "apple", "apricot", "avocado", "banana", "blueberry", "blackberry", "cherry", "coconut", "cranberry",
    "date", "dragonfruit", "grape", "guava", "grapefruit", "kiwi", "kumquat", "lemon", "lime", "lychee",
    "mango", "melon", "mulberry", "orange", "olive", "pear", "peach", "plum", "papaya", "pineapple",
]
ANIMALS = [
    "bear", "bee", "bat", "cat", "cow", "crow", "camel", "dog", "duck", "deer", "dolphin", "fox", "frog",
    "fish", "goat", "goose", "giraffe", "horse", "hen", "hare", "lion", "lamb", "llama", "mouse", "mole",
    "monkey", "owl", "otter", "ox", "pig", "parrot", "panda", "snake", "shark", "sheep", "seal", "tiger",
    "toad", "turtle", "wolf", "whale", "worm",
]
COLORS = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray")
RHYMES = (
    ("cat", "hat", "bat", "mat", "rat", "sat", "fat"),
    ("can", "fan", "man", "pan", "ran", "van", "tan"),
    ("king", "ring", "sing", "wing", "thing"),
    ("cake", "lake", "make", "take", "bake", "snake"),
    ("light", "night", "right", "sight", "fight", "tight"),
    ("bell", "tell", "well", "sell", "shell", "smell"),
    ("hill", "fill", "mill", "pill", "will", "still"),
    ("hot", "pot", "dot", "lot", "not", "got"),
)


# each family: a function -> list of distinct prompts (instruction, context, references); `count` alone
# draws its lists from the suite's generator (rng). references[0] is the answer of a single-answer family;
# a multi-answer family lists every valid answer.

def _reverse():
    templates = ("Reverse the word.", "Spell the word backwards.", "Write the word in reverse order.")
    return [(t, w, (w[::-1],)) for t in templates for w in SHORT_WORDS]


def _add():
    templates = ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.")
    return [(t.format(a=a, b=b), "", (str(a + b),)) for t in templates for a in range(13) for b in range(13)]


def _next_item():
    sequences = [("letter", LETTERS[:-1], LETTERS[1:]),  # (kind, items, the item after each)
                 ("day", DAYS, DAYS[1:] + DAYS[:1]),
                 ("month", MONTHS, MONTHS[1:] + MONTHS[:1]),
                 ("number", [str(i) for i in range(40)], [str(i) for i in range(1, 41)])]
    templates = ("What {kind} comes after {x}?", "Name the {kind} after {x}.", "Which {kind} follows {x}?")
    prompts = []
    for t in templates:
        for kind, xs, ys in sequences:
            prompts += [(t.format(kind=kind, x=x), "", (y,)) for x, y in zip(xs, ys)]
    return prompts


def _count(rng):
    templates = ("How many items are in the list?", "Count the items in the list.")
    words = sorted(set(FRUITS[:12] + ANIMALS[:12]))
    contexts = set()
    while len(contexts) < 150:
        n = int(rng.integers(1, 7))
        contexts.add(", ".join(words[i] for i in rng.choice(len(words), size=n, replace=False)))
    return [(t, c, (str(c.count(",") + 1),)) for t in templates for c in sorted(contexts)]


def _starts_with():
    asked = ("Name {a} {c} that starts with the letter {x}.", "Give me {a} {c} beginning with {x}.",
             "Which {c} starts with {x}?", "Tell me {a} {c} whose name begins with {x}.")
    given = ("Name {a} {c} that starts with the given letter.", "Give me {a} {c} starting with this letter.")
    prompts = []
    for article, category, names in (("a", "fruit", FRUITS), ("an", "animal", ANIMALS)):
        by_letter = {}
        for name in names:
            by_letter.setdefault(name[0], []).append(name)
        for letter, answers in sorted(by_letter.items()):
            if len(answers) < 2:
                continue
            # the letter in the instruction, then as the context
            prompts += [(t.format(a=article, c=category, x=letter), "", tuple(answers)) for t in asked]
            prompts += [(t.format(a=article, c=category), letter, tuple(answers)) for t in given]
    return prompts


def _number_between():
    prompts = []
    for lo in range(0, 31):
        for width in (6, 8, 10):
            hi = lo + width
            for parity, word in ((0, "even"), (1, "odd")):
                answers = tuple(str(k) for k in range(lo + 1, hi) if k % 2 == parity)
                prompts.append((f"Name an {word} number between {lo} and {hi}.", "", answers))
    return prompts


def _other_color():
    prompts = []
    for i, a in enumerate(COLORS):
        others = tuple(c for c in COLORS if c != a)
        prompts.append((f"Name a color other than {a}.", "", others))
        prompts.append((f"Give me any color except {a}.", "", others))
        for b in COLORS[i + 1:]:
            rest = tuple(c for c in others if c != b)
            prompts.append((f"Name a color other than {a} and {b}.", "", rest))
            prompts.append((f"Any color but {a} or {b}?", "", rest))
    return prompts


def _rhyme():
    templates = ("Give a word that rhymes with {w}.", "Name a word that rhymes with {w}.",
                 "What rhymes with {w}?")
    prompts = []
    for t in templates:
        for group in RHYMES:
            prompts += [(t.format(w=w), "", tuple(x for x in group if x != w)) for w in group]
    return prompts


FAMILIES = {
    "reverse": _reverse,
    "add": _add,
    "next": _next_item,
    "count": _count,
    "starts_with": _starts_with,
    "number_between": _number_between,
    "other_color": _other_color,
    "rhyme": _rhyme,
}
MULTI_ANSWER = ("starts_with", "number_between", "other_color", "rhyme")


def synthetic_suite(seed: int = 0, n_train: int = 4000, n_valid: int = 160, n_test: int = 320,
                    families=None) -> dict:
    """The built-in instruction suite: ``{"train": [...], "valid": [...], "test": [...]}`` of records.

    Every family's distinct prompts (instruction + context) are shuffled with ``seed`` and split, so the
    three splits share no prompt. Valid and test hold one record per prompt, ``n_valid`` / ``n_test`` in
    all, spread evenly over the families; a family may give at most half its prompts to them. Training
    records cycle through the remaining prompts (a prompt can recur); a multi-answer family's training
    response is one valid answer drawn at random each time, so a model fitting the data spreads its
    next-token distribution over the alternatives. Valid/test responses are the first reference.
    """
    names = list(FAMILIES) if families is None else list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown or no families {unknown}; choose from {list(FAMILIES)}")
    for name, value in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    rng = np.random.default_rng(seed)
    splits = {"train": [], "valid": [], "test": []}
    counts = zip(_split_counts(n_train, len(names)), _split_counts(n_valid, len(names)),
                 _split_counts(n_test, len(names)))
    for name, (k_train, k_valid, k_test) in zip(names, counts):
        if name == "count":  # the one family that draws its prompts from the suite's generator
            pool = FAMILIES[name](rng)
        else:
            pool = FAMILIES[name]()
        order = rng.permutation(len(pool))
        if 2 * (k_valid + k_test) > len(pool):
            raise ValueError(f"family {name!r} has {len(pool)} prompts: at most {len(pool) // 2} can go to "
                             f"valid + test, asked for {k_valid + k_test}")
        held = [pool[i] for i in order[:k_valid + k_test]]
        train_pool = [pool[i] for i in order[k_valid + k_test:]]
        splits["valid"] += [_record(p, p[2][0], name) for p in held[:k_valid]]
        splits["test"] += [_record(p, p[2][0], name) for p in held[k_valid:]]
        for i in range(k_train):
            prompt = train_pool[i % len(train_pool)]
            references = prompt[2]
            if name in MULTI_ANSWER:  # one valid answer drawn at random each time
                answer = references[int(rng.integers(len(references)))]
            else:
                answer = references[0]
            splits["train"].append(_record(prompt, answer, name))
    order = rng.permutation(len(splits["train"]))
    splits["train"] = [splits["train"][i] for i in order]
    return splits


def _split_counts(total, k):
    """``total`` spread evenly over ``k`` families, the first ones taking the remainder."""
    return [total // k + (i < total % k) for i in range(k)]


def _record(prompt, response, task):
    """The record of a prompt (instruction, context, references) with ``response``, from family ``task``."""
    instruction, context, references = prompt
    return {"instruction": instruction, "context": context, "response": response,
            "references": list(references), "task": task}


# --------------------------------------------------------------------------------------------------
# the real-text corpus
def _unit_hash(text: str) -> float:
    """The sha256 of ``text`` read as a number in [0, 1).

    A split by it is deterministic and independent of what else there is.
    """
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def lm_corpus(valid_fraction: float = 0.1) -> dict:
    """Python's help topics as ``{"train": [str, ...], "valid": [str, ...]}``, split by topic.

    The topics are ``pydoc_data.topics``, in the standard library: nothing to download. A topic goes to
    valid when the :func:`_unit_hash` of its name is below ``valid_fraction``: deterministic, and
    independent of which other topics exist.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    split = {"train": [], "valid": []}
    for name in sorted(topics):
        if _unit_hash(name) < valid_fraction:
            split["valid"].append(topics[name])
        else:
            split["train"].append(topics[name])
    return split


# --------------------------------------------------------------------------------------------------
# the user's own data
def validate_record(obj, where: str = "record") -> dict:
    """A normalized copy of a Dolly-format record; ValueError naming ``where`` when it is malformed.

    ``instruction`` and ``response`` are required strings; ``context`` defaults to "", ``references`` to
    ``[response]`` (a non-empty list of str otherwise), ``task`` to "user". MiniLLM's names are read too:
    ``input`` as the context, ``output`` as the response, or as every reference when it is a list (the
    response is then its first).
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "response" not in obj and "output" in obj:
        obj = _from_minillm(obj, where)
    for key in ("instruction", "response"):
        if key not in obj:
            raise ValueError(f"{where}: missing field {key!r}")
    for key in ("instruction", "response", "context", "task"):
        if key in obj and not isinstance(obj[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    references = obj.get("references", [obj["response"]])
    all_strings = isinstance(references, list) and all(isinstance(r, str) for r in references)
    if not all_strings or not references:
        raise ValueError(f"{where}: field 'references' must be a non-empty list of strings")
    return {"instruction": obj["instruction"], "context": obj.get("context", ""), "response": obj["response"],
            "references": list(references), "task": obj.get("task", "user")}


def _from_minillm(obj, where):
    """A record in MiniLLM's names (input, output: a str or every reference) with Dolly's names added.

    Fields the record names itself (a ``context`` or ``references`` of its own) are kept. ``output`` and
    ``input`` are checked here, where their names are known: an error about ``response`` or ``context``
    would name fields the file does not have.
    """
    output = obj["output"]
    if isinstance(output, list):
        references = output
    else:
        references = [output]
    if not references or not all(isinstance(r, str) for r in references):
        raise ValueError(f"{where}: field 'output' must be a string or a non-empty list of strings, "
                         f"got {type(output).__name__}")
    context = obj.get("input", "")
    if "context" not in obj and not isinstance(context, str):
        raise ValueError(f"{where}: field 'input' must be a string, got {type(context).__name__}")
    return {"context": context, "references": references, **obj, "response": references[0]}


def load_jsonl(path) -> list[dict]:
    """Records from a JSONL file in Dolly format, one object a line (blank lines are skipped).

    Raises ValueError "<path>:<line>: <what is wrong>" for bytes that are not UTF-8, bad JSON, a
    non-object or a missing or ill-typed field.
    """
    return [record for _, record in _numbered_records(path)]


def _numbered_records(path):
    """``[(line number, record), ...]`` of a JSONL file (see :func:`load_jsonl`)."""
    path = Path(path)
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is no JSON
                obj = json.loads(line) if line.strip() else None
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if line.strip():
                records.append((lineno, validate_record(obj, where)))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def write_jsonl(records, path) -> Path:
    """Write records one JSON object a line (UTF-8); the inverse of :func:`load_jsonl`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            f.write(json.dumps(validate_record(record, f"records[{i}]"), ensure_ascii=False) + "\n")
    return path


def load_texts(paths) -> list[str]:
    """The contents of plain-text files (UTF-8), one document per file."""
    if isinstance(paths, (str, Path)):  # one file
        paths = [paths]
    texts = []
    for path in paths:
        try:
            texts.append(Path(path).read_text(encoding="utf-8-sig"))  # a byte-order mark is not text
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
        if not texts[-1].strip():
            raise ValueError(f"{path}: no text (empty or whitespace only)")
    return texts


# --------------------------------------------------------------------------------------------------
# prompts, examples, batches
def format_prompt(record) -> str:
    """The prompt text of a record (see the module docstring); the response follows it directly."""
    prompt = f"### Instruction:\n{record['instruction']}\n\n"
    if record.get("context"):
        prompt += f"### Input:\n{record['context']}\n\n"
    return prompt + "### Response:\n"


def record_text(record) -> str:
    """Prompt + response as one string: what a tokenizer for the suite is trained on."""
    return format_prompt(record) + record["response"]


def encode_example(tokenizer: Tokenizer, record, seq_len: int, truncation: str = "left") -> tuple[list, list]:
    """``(idx, labels)`` of one record: two int lists of equal length <= seq_len.

    Masking and truncation are as the module docstring says.
    """
    if truncation not in ("left", "error"):
        raise ValueError(f"truncation must be 'left' or 'error', got {truncation!r}")
    _check_seq_len(seq_len)
    prompt = tokenizer.encode(format_prompt(record))
    answer = tokenizer.encode(record["response"]) + [tokenizer.eos_id]
    if not prompt:
        raise ValueError("the prompt encodes to no tokens")
    overflow = len(prompt) + len(answer) - (seq_len + 1)
    if overflow > 0:
        if truncation == "error" or overflow >= len(prompt):
            message = (f"example needs {len(prompt) + len(answer)} tokens ({len(prompt)} prompt, "
                       f"{len(answer)} response + eos) but a sequence holds {seq_len + 1} "
                       f"(seq_len {seq_len})")
            if truncation != "error":  # even one prompt token leaves no room
                message += "; the response alone does not fit"
            raise ValueError(message)
        prompt = prompt[overflow:]  # cut from the left
    seq = prompt + answer
    # labels[t] = seq[t + 1]: the targets inside the prompt (its tokens after the first) are not counted
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + answer
    return seq[:-1], labels


def instruction_examples(records, tokenizer: Tokenizer, seq_len: int, truncation: str = "left",
                         places=None) -> list:
    """:func:`encode_example` over records; an error names the record's place or its index.

    ``places[i]`` is record i's place, such as "file.jsonl:11".
    """
    examples = []
    for i, record in enumerate(records):
        try:
            examples.append(encode_example(tokenizer, record, seq_len, truncation))
        except ValueError as e:
            place = places[i] if places else f"record {i}"
            raise ValueError(f"{place} ({record.get('task', '?')}): {e}") from None
    return examples


def lm_examples(texts, tokenizer: Tokenizer, seq_len: int) -> list:
    """Language-modelling examples: the texts' tokens cut into chunks of seq_len + 1 tokens.

    Each text is followed by eos and the texts are concatenated; the chunks overlap by one, so that every
    token after the first is a label exactly once; the last incomplete chunk is dropped. Each example is
    ``(chunk[:-1], chunk[1:])``, every label counted.
    """
    _check_seq_len(seq_len)
    stream = []
    for text in texts:
        stream += tokenizer.encode(text) + [tokenizer.eos_id]
    return [(stream[s:s + seq_len], stream[s + 1:s + seq_len + 1])
            for s in range(0, len(stream) - seq_len, seq_len)]


def _check_seq_len(seq_len):
    """A clear error for a sequence length that is no positive integer (an example needs one input)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")


def collate(examples, pad_id: int, device: str | None = None):
    """A batch ``(idx, labels)``, each (B, T) int64, from a list of (idx, labels) rows.

    T = the longest row; shorter rows are right-padded with ``pad_id`` (the tokenizer's eos id) in idx
    and -100 in labels, so padding follows every counted position (the batch contract in the module
    docstring). NumPy arrays, or moved to ``device`` when given.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    T = max(len(x) for x, _ in examples)
    idx = np.full((len(examples), T), pad_id, dtype=np.int64)
    labels = np.full((len(examples), T), IGNORE_INDEX, dtype=np.int64)
    for b, (x, y) in enumerate(examples):
        idx[b, :len(x)] = x
        labels[b, :len(y)] = y
    if device is not None:
        idx = to_device(idx, device)
        labels = to_device(labels, device)
    return idx, labels


class BatchIterator:
    """Endless batches of ``batch_size`` examples in seeded random order.

    Epoch e visits the examples in the order ``default_rng([seed, e]).permutation(n)``; a batch that
    reaches the end of an epoch continues into the next, so every batch has ``batch_size`` rows and no
    example is skipped. ``state()`` is ``{"seed", "epoch", "offset"}`` (ints); ``restore(state)`` returns
    to that point, and the batches that follow are identical to those of an uninterrupted run.
    """

    def __init__(self, examples, batch_size: int, pad_id: int, seed: int = 0, device: str | None = None):
        if not examples:
            raise ValueError("no examples to batch")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.device = device
        self.seed = int(seed)
        self.epoch = 0
        self.offset = 0  # the position in this epoch's permutation
        self._order = self._permutation(0)

    def _permutation(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def state(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def restore(self, state: dict) -> "BatchIterator":
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this iterator has seed {self.seed}")
        if not 0 <= int(state["offset"]) < len(self.examples) or int(state["epoch"]) < 0:
            raise ValueError(f"state {state} does not fit {len(self.examples)} examples")
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._order = self._permutation(self.epoch)
        return self

    def __iter__(self):
        return self

    def __next__(self):
        rows = []
        while len(rows) < self.batch_size:
            take = self._order[self.offset:self.offset + self.batch_size - len(rows)]
            rows += [self.examples[i] for i in take]
            self.offset += len(take)
            if self.offset == len(self.examples):  # the epoch is done: the batch continues into the next
                self.epoch += 1
                self.offset = 0
                self._order = self._permutation(self.epoch)
        return collate(rows, self.pad_id, self.device)


def eval_batches(examples, batch_size: int, pad_id: int, device: str | None = None):
    """Every example once, in order, in batches of ``batch_size`` (the last may be smaller)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_id, device)


# --------------------------------------------------------------------------------------------------
# choosing a dataset by name
def load_dataset(spec: str) -> dict:
    """A dataset by name or path, as ``{"kind", "train", "valid", "test"}``.

    - ``"synthetic"``: the built-in instruction suite (``kind = "instructions"``, records);
    - ``"pydoc"``: Python's help topics (``kind = "text"``, strings; test = valid);
    - a file of Dolly-format records (JSON Lines, or a JSON array), or a directory of them; a text file or
      a directory of them: plain text. What a file holds is read from its content, whatever its name
      (see :func:`_read_dataset_files`).
      About 10% of the records or files (chosen by a hash of their index) are held out as valid = test;
      of a single text file, its last tenth of lines. ``places`` names each record's file and line.
    """
    if spec == "synthetic":
        return {"kind": "instructions", **synthetic_suite()}
    if spec == "pydoc":
        corpus = lm_corpus()
        return {"kind": "text", "train": corpus["train"], "valid": corpus["valid"], "test": corpus["valid"]}
    if not spec.strip():  # Path("") is the current directory, which would be read whole
        raise ValueError("no dataset given (the name is empty)")
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"no dataset {spec!r}: use 'synthetic', 'pydoc', a .jsonl or .json file, "
                                "text files, or a directory of them")
    if not (path.is_file() or path.is_dir()):  # reading /dev/zero or a pipe would never end
        raise ValueError(f"{spec}: not a file or a directory (a device, pipe or socket is no dataset)")
    kind, items, places = _read_dataset_files(path)
    if len(items) < 2:
        raise ValueError(f"{path}: at least two records, files or lines are needed "
                         "(one to train, one to validate)")
    held = {i for i in range(len(items)) if _unit_hash(str(i)) < 0.1}
    if not held:  # too few items for the hash to pick one: the last is held out
        held = {len(items) - 1}

    def split(xs, valid):
        return [x for i, x in enumerate(xs) if (i in held) == valid]

    dataset = {"kind": kind, "source": str(path), "train": split(items, False), "valid": split(items, True)}
    if places:
        dataset["places"] = {"train": split(places, False), "valid": split(places, True),
                             "test": split(places, True)}
    return {**dataset, "test": dataset["valid"]}


RECORD_SUFFIXES = (".jsonl", ".ndjson", ".json")  # names that promise records; content decides for others


def _read_dataset_files(path):
    """``(kind, items, places)``: the records of record files, or the text of text files.

    What a file holds is read from its content (:func:`_record_layout`), never from its name alone: JSON
    Lines named .ndjson, .csv or .txt are records, and a file named .jsonl or .json that holds no records
    is refused with the line at fault. A directory is read whole (hidden files aside): all record files,
    or all text files; one that mixes the two is refused with the reason. ``places`` holds each record's
    "file:line" (or "file[index]"), for error messages (``dataset["places"][split]``).
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"{path} holds no dataset file (records or text)")
    else:
        files = [path]
    layouts = {file: _record_layout(file) for file in files}
    records = [file for file in files if layouts[file] is not None]
    texts = [file for file in files if layouts[file] is None]
    if records and texts:
        raise ValueError(f"{path} holds both records ({records[0].name}, ...) and text ({texts[0].name}, "
                         "...): give a file, or a directory of one kind")
    if records:
        items = []
        places = []
        for file in records:
            for place, record in _records_of(file, layouts[file]):
                places.append(place)
                items.append(record)
        return "instructions", items, places
    items = load_texts(texts)
    if len(items) == 1:  # a single text file: its last tenth of lines becomes a second item, held out
        lines = items[0].splitlines(keepends=True)
        cut = len(lines) - max(len(lines) // 10, 1)
        if cut > 0:
            items = ["".join(lines[:cut]), "".join(lines[cut:])]
    return "text", items, None


def _record_layout(path):
    """How ``path`` holds records: "lines" (JSON Lines), "array" (a JSON array), or None: it is text.

    The content decides: a file that is one JSON array of objects is an array, a file whose first line
    that is not blank is a JSON object is JSON Lines, and anything else is text, whatever its name. Only
    a name that promises records changes what happens to other content: a .json file is read as one JSON
    value and a .jsonl or .ndjson file as JSON Lines, so that the error says which line is no record.
    """
    suffix = path.suffix.lower()
    whole = _json_of(path)
    if suffix == ".json" and whole is not None:
        return "array"
    if isinstance(whole, list) and whole and all(isinstance(obj, dict) for obj in whole):
        return "array"
    try:
        first = json.loads(_first_line(path))
    except json.JSONDecodeError:
        first = None  # not JSON, or an object written over several lines
    if isinstance(first, dict):
        return "lines"
    if suffix == ".json":
        return "array"
    if suffix in RECORD_SUFFIXES:
        return "lines"
    return None


def _first_line(path):
    """The first line of ``path`` that is not blank, stripped ("" if none or not UTF-8)."""
    with path.open("rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8-sig").strip()  # a byte-order mark is not content
            except UnicodeDecodeError:
                return ""
            if line:
                return line
    return ""


def _json_of(path):
    """The JSON value ``path`` holds as a whole, or None when it is not one (or not UTF-8)."""
    if _first_line(path)[:1] not in ("[", "{"):  # no need to read a text file whole
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _records_of(path, layout):
    """``[(place, record), ...]`` of JSON Lines (place "file:line") or a JSON array (place "file[i]")."""
    if layout == "lines":
        return [(f"{path}:{lineno}", record) for lineno, record in _numbered_records(path)]
    try:
        array = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(array, list) or not array:
        raise ValueError(f"{path}: a .json dataset is a non-empty array of records (one object a record); "
                         "for one record a line use .jsonl")
    return [(f"{path}[{i}]", validate_record(obj, f"{path}[{i}]")) for i, obj in enumerate(array)]


def examples_for(dataset: dict, split: str, tokenizer: Tokenizer, seq_len: int) -> list:
    """Encoded examples of one split (instruction masking or language modelling, by the dataset's kind)."""
    if dataset["kind"] == "instructions":
        places = dataset.get("places", {}).get(split)
        return instruction_examples(dataset[split], tokenizer, seq_len, places=places)
    return lm_examples(dataset[split], tokenizer, seq_len)


def training_texts(dataset: dict) -> list[str]:
    """The texts a tokenizer for ``dataset`` learns from: the training split, records as prompt + response."""
    if dataset["kind"] == "instructions":
        return [record_text(r) for r in dataset["train"]]
    return list(dataset["train"])


def max_vocab_size(texts) -> int:
    """The most tokens a byte-level BPE can learn from ``texts``: 257 + the number of their UTF-8 bytes.

    The vocabulary starts with the 256 bytes and the end-of-text token, and each merge adds one token.
    A merge joins a pair of adjacent symbols wherever it occurs, so it shortens the training text by at
    least one symbol; text of N bytes (N symbols to begin with) leaves room for fewer than N merges.
    A larger vocab_size can never be reached, and ``tokenizers`` reserves a table for vocab_size entries
    before it reads the text (up to 75 bytes an entry; for 1e9 it asked for 71 GB and aborted the
    process), so :func:`prepare` refuses it before training.
    """
    return MIN_VOCAB_SIZE + sum(len(text.encode("utf-8")) for text in texts)


def check_vocab_size(texts, vocab_size: int, name: str = "vocab_size"):
    """A clear error, naming the setting ``name``, when ``texts`` cannot give ``vocab_size`` tokens."""
    limit = max_vocab_size(texts)
    if vocab_size > limit:
        raise ValueError(f"{name} {vocab_size} is more than the training text can give: its "
                         f"{limit - MIN_VOCAB_SIZE} bytes make at most {limit} tokens (256 bytes, the "
                         "end-of-text token and one token a merge, each merge shortening the text)")


def prepare(dataset: dict, seq_len: int, *, tokenizer: Tokenizer | None = None, vocab_size: int = 1024,
            splits=("train", "valid", "test")) -> tuple[Tokenizer, dict]:
    """The pipeline data -> tokenizer -> examples: ``(tokenizer, {split: examples})``.

    ``dataset`` is of :func:`load_dataset`'s form; a byte-level BPE of ``vocab_size`` is trained on the
    training texts unless ``tokenizer`` is given (a teacher's, say).
    """
    if tokenizer is None:
        texts = training_texts(dataset)
        check_vocab_size(texts, vocab_size)
        tokenizer = Tokenizer.train(texts, vocab_size)
    examples = {split: examples_for(dataset, split, tokenizer, seq_len) for split in splits}
    for split, rows in examples.items():
        if not rows:
            raise ValueError(f"{dataset.get('source', 'the dataset')}: its {split} split makes no example of "
                             f"{seq_len + 1} tokens (seq_len {seq_len}); give more text or a smaller seq_len")
    return tokenizer, examples
