"""The synthetic suite, the corpus, file loading, masking, chunking and resumable batching."""

import json

import numpy as np
import pytest

from minitodi import data
from minitodi.core.layers import IGNORE_INDEX
from minitodi.metrics import exact_match
from minitodi.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def large_suite():
    """The synthetic suite at seed 0 with 1600 training, 80 validation and 160 test records."""
    return data.synthetic_suite(seed=0, n_train=1600, n_valid=80, n_test=160)


@pytest.fixture(scope="module")
def large_suite_tokenizer(large_suite):
    """A byte-level BPE of 400 tokens trained on the large suite's training records."""
    return Tokenizer.train([data.record_text(r) for r in large_suite["train"]], 400)


def _prompt(r):
    return (r["instruction"], r["context"])


# ------------------------------------------------------------------------------- the synthetic suite


def test_suite_sizes_fields_and_families(large_suite):
    assert [len(large_suite[s]) for s in ("train", "valid", "test")] == [1600, 80, 160]
    for split in large_suite.values():
        for r in split:
            assert data.validate_record(r) == r
    assert {r["task"] for r in large_suite["test"]} == set(data.FAMILIES)
    assert set(data.MULTI_ANSWER) < set(data.FAMILIES)


def test_splits_share_no_prompt(large_suite):
    train, valid, test = ({_prompt(r) for r in large_suite[s]} for s in ("train", "valid", "test"))
    assert not train & valid and not train & test and not valid & test
    assert len(valid) == 80 and len(test) == 160  # one record per held-out prompt


def test_every_response_is_one_of_its_references(large_suite):
    for split in large_suite.values():
        for r in split:
            assert r["response"] in r["references"]
            assert exact_match(r["response"], r["references"]) == 100.0


def test_multi_answer_families_spread_training_answers(large_suite):
    for family in data.MULTI_ANSWER:
        records = [r for r in large_suite["train"] if r["task"] == family]
        assert all(len(r["references"]) >= 2 for r in records)
        assert len({r["response"] for r in records}) >= 5
    answers = {}
    for r in large_suite["train"]:
        answers.setdefault(_prompt(r), set()).add(r["response"])
    varied = [a for a in answers.values() if len(a) > 1]
    assert varied, "some multi-answer prompt should be trained with different answers"


@pytest.mark.parametrize("family", sorted(data.FAMILIES))
def test_each_family_answers_correctly(family):
    """Spot-check the references of each family against the task's meaning."""
    if family == "count":  # the one family that draws its prompts from a generator
        prompts = data.FAMILIES[family](np.random.default_rng(1))
    else:
        prompts = data.FAMILIES[family]()
    assert len({(i, c) for i, c, _ in prompts}) == len(prompts)
    for instruction, context, refs in prompts:
        words = instruction.rstrip(".?").split()
        if family == "reverse":
            assert refs == (context[::-1],)
        elif family == "add":
            a, b = [int(w) for w in words if w.isdigit()]
            assert refs == (str(a + b),)
        elif family == "count":
            assert refs == (str(len(context.split(", "))),)
        elif family == "starts_with":
            letter = context or words[-1]
            assert all(x[0] == letter for x in refs) and len(refs) >= 2
        elif family == "number_between":
            lo, hi = [int(w) for w in words if w.isdigit()]
            parity = 0 if "even" in words else 1
            assert refs == tuple(str(k) for k in range(lo + 1, hi) if k % 2 == parity)
        elif family == "other_color":
            excluded = {w for w in words if w in data.COLORS}
            assert set(refs) == set(data.COLORS) - excluded
        elif family == "rhyme":
            target = words[-1]
            assert target not in refs and all(x[-2:] == target[-2:] for x in refs)
        elif family == "next":
            x = words[-1]
            if x in data.DAYS:
                assert refs == (data.DAYS[(data.DAYS.index(x) + 1) % 7],)
            elif x in data.MONTHS:
                assert refs == (data.MONTHS[(data.MONTHS.index(x) + 1) % 12],)
            elif x.isdigit():
                assert refs == (str(int(x) + 1),)
            else:
                assert refs == (chr(ord(x) + 1),)


def test_suite_is_seeded(large_suite):
    again = data.synthetic_suite(seed=0, n_train=1600, n_valid=80, n_test=160)
    other = data.synthetic_suite(seed=1, n_train=1600, n_valid=80, n_test=160)
    assert again == large_suite
    assert other["test"] != large_suite["test"]


def test_suite_rejects_impossible_requests():
    with pytest.raises(ValueError, match="at most"):
        data.synthetic_suite(n_valid=800, n_test=800)
    with pytest.raises(ValueError, match="unknown"):
        data.synthetic_suite(families=["poetry"])


# ------------------------------------------------------------------------------------ the corpus


def test_lm_corpus_split_is_deterministic_and_disjoint():
    a, b = data.lm_corpus(), data.lm_corpus()
    assert a == b
    assert a["train"] and a["valid"] and not set(a["train"]) & set(a["valid"])
    assert len(a["valid"]) < len(a["train"])


# ------------------------------------------------------------------------------- the user's files


def test_load_jsonl_defaults_and_round_trip(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Say hi.", "response": "hi"}\n\n'
                    '{"instruction": "Sum", "context": "1 2", "response": "3", '
                    '"references": ["3", "three"]}\n')
    records = data.load_jsonl(path)
    assert records[0] == {"instruction": "Say hi.", "context": "", "response": "hi", "references": ["hi"],
                          "task": "user"}
    assert records[1]["references"] == ["3", "three"]
    data.write_jsonl(records, tmp_path / "back.jsonl")
    assert data.load_jsonl(tmp_path / "back.jsonl") == records


@pytest.mark.parametrize("bad_line, message", [
    ('{"instruction": "x", "response": ', "invalid JSON"),
    ('["instruction", "response"]', "expected a JSON object"),
    ('{"instruction": "x"}', "missing field 'response'"),
    ('{"instruction": "x", "response": 3}', "'response' must be a string"),
    ('{"instruction": "x", "response": "y", "context": null}', "'context' must be a string"),
    ('{"instruction": "x", "response": "y", "references": []}', "'references' must be a non-empty list"),
    ('{"instruction": "x", "response": "y", "references": "y"}', "'references' must be a non-empty list"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "a", "response": "b"})
    path.write_text(f"{good}\n\n{good}\n{bad_line}\n{good}\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:4: .*{message}"):
        data.load_jsonl(path)


def test_load_texts(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"ok \xff")
    assert data.load_texts(tmp_path / "a.txt") == ["héllo\n"]
    with pytest.raises(ValueError, match=r"b\.txt: not UTF-8"):
        data.load_texts([tmp_path / "a.txt", tmp_path / "b.txt"])


# ------------------------------------------------------------------------------- prompts and masking


def test_prompt_format_omits_empty_input():
    with_context = data.format_prompt({"instruction": "Reverse the word.", "context": "cat"})
    assert with_context == "### Instruction:\nReverse the word.\n\n### Input:\ncat\n\n### Response:\n"
    without_context = data.format_prompt({"instruction": "Add 1 and 2.", "context": ""})
    assert without_context == "### Instruction:\nAdd 1 and 2.\n\n### Response:\n"


def test_masking_counts_exactly_the_response_and_eos(large_suite, large_suite_tokenizer):
    tok = large_suite_tokenizer
    records = large_suite["test"][::20]
    examples = data.instruction_examples(records, tok, seq_len=64)
    idx, labels = data.collate(examples, tok.eos_id)
    assert idx.dtype == labels.dtype == np.int64 and idx.shape == labels.shape
    for b, r in enumerate(records):
        prompt, answer = tok.encode(data.format_prompt(r)), tok.encode(r["response"]) + [tok.eos_id]
        n = len(prompt) + len(answer) - 1  # inputs in this row
        np.testing.assert_array_equal(idx[b, :n], (prompt + answer)[:-1])
        seq = prompt + answer
        for t in range(idx.shape[1]):
            if len(prompt) <= t + 1 < len(seq):  # the target seq[t + 1] is a response token or the eos
                assert labels[b, t] == seq[t + 1]
            else:  # a prompt target, or padding
                assert labels[b, t] == IGNORE_INDEX
        assert (idx[b, n:] == tok.eos_id).all()
        assert tok.decode(labels[b][labels[b] != IGNORE_INDEX]) == r["response"] + "<|endoftext|>"


def test_truncation_cuts_the_prompt_from_the_left_or_raises(large_suite_tokenizer):
    tok = large_suite_tokenizer
    record = {"instruction": "word " * 40, "context": "", "response": "banana split"}
    prompt, answer = tok.encode(data.format_prompt(record)), tok.encode("banana split") + [tok.eos_id]
    x, y = data.encode_example(tok, record, seq_len=16)
    assert len(x) == len(y) == 16
    assert x == (prompt + answer)[-17:-1]
    assert [v for v in y if v != IGNORE_INDEX] == answer
    with pytest.raises(ValueError, match="seq_len"):
        data.encode_example(tok, record, seq_len=16, truncation="error")
    with pytest.raises(ValueError, match="response alone does not fit"):
        data.encode_example(tok, dict(record, response="word " * 30), seq_len=16)
    with pytest.raises(ValueError, match="record 1"):
        data.instruction_examples([record, dict(record, response="word " * 30)], tok, seq_len=16)


# --------------------------------------------------------------------------------- LM chunking


def test_lm_chunks_cover_the_stream_with_every_label_counted(large_suite_tokenizer):
    tok = large_suite_tokenizer
    texts = ["first text. " * 5, "second one!", "third " * 9]
    stream = []
    for t in texts:
        stream += tok.encode(t) + [tok.eos_id]
    T = 7
    examples = data.lm_examples(texts, tok, seq_len=T)
    assert len(examples) == (len(stream) - 1) // T
    for k, (x, y) in enumerate(examples):
        assert x == stream[k * T:(k + 1) * T] and y == stream[k * T + 1:(k + 1) * T + 1]
    labels = [v for _, y in examples for v in y]
    assert labels == stream[1:1 + len(labels)] and IGNORE_INDEX not in labels


# --------------------------------------------------------------------------------- batching


def _examples(n):
    return [([i] * (1 + i % 3), [i] * (1 + i % 3)) for i in range(n)]


def test_iterator_visits_every_example_once_per_epoch():
    it = data.BatchIterator(_examples(10), batch_size=4, pad_id=99, seed=3)
    seen = [int(v) for _ in range(5) for v in next(it)[0][:, 0]]  # 20 rows = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a new permutation each epoch
    assert it.state() == {"seed": 3, "epoch": 2, "offset": 0}


def test_iterator_resume_reproduces_the_batches():
    rows = _examples(13)
    straight = data.BatchIterator(rows, batch_size=5, pad_id=99, seed=7)
    for _ in range(4):
        next(straight)
    saved = json.loads(json.dumps(straight.state()))  # a state survives JSON
    expected = [next(straight) for _ in range(6)]
    resumed = data.BatchIterator(rows, batch_size=5, pad_id=99, seed=7).restore(saved)
    for want, got in zip(expected, (next(resumed) for _ in range(6))):
        np.testing.assert_array_equal(want[0], got[0])
        np.testing.assert_array_equal(want[1], got[1])
    with pytest.raises(ValueError, match="seed"):
        data.BatchIterator(rows, batch_size=5, pad_id=99, seed=8).restore(saved)


def test_collate_pads_and_eval_batches_keep_order():
    idx, labels = data.collate([([1, 2, 3], [2, 3, 4]), ([5], [IGNORE_INDEX])], pad_id=0)
    np.testing.assert_array_equal(idx, [[1, 2, 3], [5, 0, 0]])
    np.testing.assert_array_equal(labels, [[2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    batches = list(data.eval_batches(_examples(7), batch_size=3, pad_id=0))
    assert [b[0].shape[0] for b in batches] == [3, 3, 1]
    assert [int(v) for b in batches for v in b[0][:, 0]] == list(range(7))
    with pytest.raises(ValueError, match="empty"):
        data.collate([], pad_id=0)


def test_data_file_errors_name_the_file_and_the_line(tmp_path):
    good = json.dumps({"instruction": "a", "response": "b"})
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(f"{good}\n{good}\n".encode() + b'{"instruction": "caf\xe9", "response": "b"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:3: not UTF-8"):
        data.load_dataset(str(path))
    long = tmp_path / "long.jsonl"  # blank lines: the record's index is not its line
    long.write_text(f"{good}\n\n\n" * 5 + json.dumps({"instruction": "a", "response": "word " * 80}) + "\n")
    tok = Tokenizer.train(["a b word"] * 3, 280)
    dataset = data.load_dataset(str(long))
    with pytest.raises(ValueError, match=r"long\.jsonl:16 \(user\): example needs"):
        data.prepare(dataset, 32, tokenizer=tok)
    (tmp_path / "texts").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "texts" / name).write_text(" \n\t\n")
    with pytest.raises(ValueError, match=r"a\.txt: no text"):
        data.load_dataset(str(tmp_path / "texts"))


def test_a_single_text_file_is_a_dataset(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i} of the book\n" for i in range(40)))
    dataset = data.load_dataset(str(path))
    assert dataset["train"][0].endswith("line 35 of the book\n") and dataset["valid"] == [
        "".join(f"line {i} of the book\n" for i in range(36, 40))]
    tok, examples = data.prepare(dataset, 16, vocab_size=280)
    assert examples["train"] and examples["valid"]


def _dolly(n):
    return [{"instruction": f"say {i}", "context": "", "response": f"word{i}"} for i in range(n)]


def test_a_json_array_of_records_is_read_as_records(tmp_path):
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(_dolly(12), indent=2))
    dataset = data.load_dataset(str(path))
    assert dataset["kind"] == "instructions"
    assert len(dataset["train"]) + len(dataset["valid"]) == 12
    assert all(place.startswith(f"{path}[") for place in dataset["places"]["train"])


def test_jsonl_whatever_the_case_of_its_suffix_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "UPPER.JSONL"
    lines = [json.dumps(record) for record in _dolly(12)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8"))
    dataset = data.load_dataset(str(path))
    assert dataset["kind"] == "instructions"
    assert sorted(r["instruction"] for r in dataset["train"] + dataset["valid"]) == sorted(
        r["instruction"] for r in _dolly(12))


def test_a_text_file_with_a_byte_order_mark_loses_the_mark(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"line\n" * 20)
    dataset = data.load_dataset(str(path))
    assert not any(text.startswith("\ufeff") for text in dataset["train"])


def test_a_directory_of_record_files_is_read_whole(tmp_path):
    data.write_jsonl(_dolly(6), tmp_path / "a.jsonl")
    data.write_jsonl(_dolly(6)[::-1], tmp_path / "b.jsonl")
    dataset = data.load_dataset(str(tmp_path))
    assert dataset["kind"] == "instructions"
    assert len(dataset["train"]) + len(dataset["valid"]) == 12


@pytest.mark.parametrize("extra", ["notes.txt", "README.md"])
def test_a_directory_of_mixed_files_is_refused_with_the_reason(tmp_path, extra):
    data.write_jsonl(_dolly(6), tmp_path / "a.jsonl")
    (tmp_path / extra).write_text("some words\n")
    with pytest.raises(ValueError, match=rf"both records \(a\.jsonl, \.\.\.\) and text \({extra}"):
        data.load_dataset(str(tmp_path))


@pytest.mark.parametrize("name", ["data.ndjson", "data.csv", "data.txt", "data", "data.JSON"])
def test_json_lines_are_records_whatever_the_files_name(tmp_path, name):
    """The content decides: JSON Lines named .ndjson, .csv, .txt or nothing are records, not text."""
    path = tmp_path / name
    path.write_text("".join(json.dumps(record) + "\n" for record in _dolly(12)))
    dataset = data.load_dataset(str(path))
    assert dataset["kind"] == "instructions"
    assert sorted(r["response"] for r in dataset["train"] + dataset["valid"]) == sorted(
        r["response"] for r in _dolly(12))
    assert dataset["places"]["train"][0].startswith(f"{path}:")


def test_a_json_array_under_any_name_is_records_and_a_directory_is_read_by_content(tmp_path):
    (tmp_path / "part1.csv").write_text(json.dumps(_dolly(6), indent=2))
    (tmp_path / "part2.ndjson").write_text("".join(json.dumps(record) + "\n" for record in _dolly(6)))
    dataset = data.load_dataset(str(tmp_path))
    assert dataset["kind"] == "instructions" and len(dataset["train"]) + len(dataset["valid"]) == 12


def test_text_that_starts_like_json_is_still_text(tmp_path):
    """A bracket or a brace that begins no JSON record leaves a text file text."""
    path = tmp_path / "notes.md"
    path.write_text("[a link](somewhere)\n{ a brace, no JSON\n" * 10)
    dataset = data.load_dataset(str(path))
    assert dataset["kind"] == "text" and dataset["train"][0].startswith("[a link]")
    table = tmp_path / "table.csv"
    table.write_text("instruction,response\n" + "say a,a\n" * 10)
    assert data.load_dataset(str(table))["kind"] == "text"


def test_a_jsonl_or_ndjson_file_of_text_is_refused_naming_the_line(tmp_path):
    for name in ("prose.jsonl", "prose.ndjson"):
        path = tmp_path / name
        path.write_text("just some prose\nand more\n")
        with pytest.raises(ValueError, match=rf"{name}:1: invalid JSON"):
            data.load_dataset(str(path))


def test_a_json_file_that_is_not_an_array_of_records_is_refused(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(_dolly(1)[0]))
    with pytest.raises(ValueError, match="a non-empty array of records"):
        data.load_dataset(str(path))


@pytest.mark.parametrize("seq_len", [0, -919, 2.5])
def test_a_sequence_length_that_is_no_positive_integer_is_named(large_suite_tokenizer, seq_len):
    """Not numpy's or range()'s words ("range() arg 3 must not be zero", "seq_len + 1 = -918")."""
    with pytest.raises(ValueError, match=rf"seq_len must be a positive integer, got {seq_len}"):
        data.lm_examples(["some text to cut into chunks"], large_suite_tokenizer, seq_len)
    with pytest.raises(ValueError, match=rf"seq_len must be a positive integer, got {seq_len}"):
        data.encode_example(large_suite_tokenizer, _dolly(1)[0], seq_len)


def test_a_vocabulary_the_text_cannot_give_is_refused_before_tokenizers_runs(monkeypatch):
    """257 + the text's bytes bounds what BPE can learn; a larger vocab_size never reaches `tokenizers`."""
    dataset = {"kind": "text", "train": ["abab abab", "cdcd"], "valid": ["abcd"], "test": ["abcd"]}
    limit = data.max_vocab_size(data.training_texts(dataset))
    assert limit == 257 + 9 + 4
    assert Tokenizer.train(dataset["train"], limit).vocab_size <= limit

    def never(*args, **kwargs):
        raise AssertionError("tokenizers was asked for the vocabulary")

    monkeypatch.setattr(Tokenizer, "train", never)
    with pytest.raises(ValueError, match=rf"vocab_size {limit + 1} is more than the training text can give: "
                                         rf"its 13 bytes make at most {limit} tokens"):
        data.prepare(dataset, 2, vocab_size=limit + 1)


def test_an_empty_name_is_no_dataset(tmp_path, monkeypatch):
    """Path("") is ".": the directory the command runs in would have been read as the dataset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("line\n" * 20)
    for spec in ("", " "):
        with pytest.raises(ValueError, match="no dataset given"):
            data.load_dataset(spec)


def test_a_device_or_pipe_is_no_dataset(tmp_path):
    """/dev/zero has no end and no newline: reading it as a dataset would fill the memory."""
    import os

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for path in ("/dev/zero", pipe):
        with pytest.raises(ValueError, match="not a file or a directory"):
            data.load_dataset(str(path))


@pytest.mark.parametrize("record, words", [
    ({"instruction": "i", "output": 5}, "field 'output' must be a string or a non-empty list of strings"),
    ({"instruction": "i", "output": ["a", 5]},
     "field 'output' must be a string or a non-empty list of strings"),
    ({"instruction": "i", "output": []}, "field 'output' must be a string or a non-empty list of strings"),
    ({"instruction": "i", "output": "a", "input": 5}, "field 'input' must be a string, got int"),
])
def test_a_bad_minillm_field_is_named_as_the_file_spells_it(record, words):
    """``"output": 5`` said "field 'response' must be a string", a field the file does not have."""
    with pytest.raises(ValueError) as refused:
        data.validate_record(record, "f.jsonl:1")
    assert str(refused.value).startswith(f"f.jsonl:1: {words}")


def test_minillm_fields_are_read_as_dolly_fields():
    record = data.validate_record({"instruction": "i", "input": "c", "output": ["a", "b"]})
    assert (record["context"], record["response"], record["references"]) == ("c", "a", ["a", "b"])
