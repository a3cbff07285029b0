"""Calibration data: defaults, formats, chat template, deterministic sampling, bad inputs named by file."""

import json
import shutil

import pytest
import torch

from calib.data import FIXTURE_DATA, MODEL_DEFAULTS, defaults_for, load_calibration, open_source
from convert.errors import BadInput
from convert.fixtures import BUNDLED_FIXTURE, fixture_config

MODEL = BUNDLED_FIXTURE  # tokenizer + config are all the data loader needs
WORDS = "the quick brown fox jumps over the lazy dog while a calibration set is sampled from the rows "


def _rows(k=40):
    return [{"id": i, "text": f"row {i}: " + WORDS * 3} for i in range(k)]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL, local_files_only=True)


def test_fixture_defaults_and_determinism():
    d = defaults_for(MODEL)
    assert (d.n, d.seq_len) == (64, 256) and d.dataset == str(FIXTURE_DATA)
    a = load_calibration(MODEL)
    assert a.ids.shape == (64, 256) and a.ids.dtype == torch.long
    assert 0 <= int(a.ids.min()) and int(a.ids.max()) < fixture_config()["vocab_size"]
    assert a.dataset["kind"] == "local" and list(a.dataset["files"]) == ["calib.txt"]
    assert torch.equal(a.ids, load_calibration(MODEL).ids)            # same seed, same tokens
    b = load_calibration(MODEL, seed=1)
    assert not torch.equal(a.ids, b.ids)                               # the seed picks other windows
    assert len({tuple(r) for r in a.ids[:, :16].tolist()}) == 64       # 64 distinct windows


def test_real_model_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(fixture_config(hidden_size=4096)))
    assert defaults_for(tmp_path) == MODEL_DEFAULTS
    assert (MODEL_DEFAULTS.n, MODEL_DEFAULTS.seq_len) == (512, 2048)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(MODEL / "config.json", copy / "config.json")  # a copy of the fixture (e.g. pulled) is the fixture
    assert defaults_for(copy).n == 64


def test_text_file_matches_tokenizer(tmp_path, tok):
    p = tmp_path / "plain.txt"
    p.write_text(WORDS * 200)
    d = load_calibration(MODEL, str(p), n=3, seq_len=32)
    stream = tok.backend_tokenizer.encode(WORDS * 200, add_special_tokens=False).ids
    text = " ".join(map(str, stream))
    for row in d.ids.tolist():  # every sequence is a contiguous window of the text (one block, no separators)
        assert " ".join(map(str, row)) in text


@pytest.mark.parametrize("fmt", ["jsonl", "json-list", "json-dict", "parquet", "other-column"])
def test_row_formats(tmp_path, tok, fmt):
    rows = _rows()
    if fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    elif fmt == "json-list":
        p = tmp_path / "d.json"
        p.write_text(json.dumps(rows))
    elif fmt == "json-dict":
        p = tmp_path / "d.json"
        p.write_text(json.dumps({"data": rows}))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p)
    else:  # the only string column is used, whatever its name
        p = tmp_path / "d.jsonl"
        p.write_text("\n".join(json.dumps({"id": r["id"], "body": r["text"]}) for r in rows))
    d = load_calibration(MODEL, str(p), n=4, seq_len=48, seed=3)
    assert d.ids.shape == (4, 48)
    assert (d.ids == tok.eos_token_id).any()  # text rows are packed with EOS between documents
    assert d.dataset["files"][p.name]["size"] == p.stat().st_size


def test_chat_rows_use_the_model_template(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": f"question {i}? " + WORDS},
                          {"role": "assistant", "content": f"answer {i}. " + WORDS}]} for i in range(30)]
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    d = load_calibration(MODEL, str(p), n=4, seq_len=64)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert (d.ids == im_start).any() and (d.ids == tok.bos_token_id).any()
    rendered = tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert rendered.startswith(tok.bos_token) and "<|im_start|>assistant" in rendered


def test_folder_of_files(tmp_path):
    (tmp_path / "a.txt").write_text(WORDS * 40)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in _rows()))
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.txt").write_text("ignored")
    src = open_source(str(tmp_path))
    assert [p.name for p in src.files] == ["a.txt", "b.jsonl"]
    d = load_calibration(MODEL, str(tmp_path), n=4, seq_len=64)
    assert set(d.dataset["files"]) == {"a.txt", "b.jsonl"}


def test_fingerprint_follows_contents(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text(WORDS * 10)
    before = open_source(str(p)).fingerprint()
    p.write_text(WORDS * 11)
    after = open_source(str(p)).fingerprint()
    assert before["sha256"] != after["sha256"]


def test_hub_ids_are_not_fetched_at_open():
    src = open_source("HuggingFaceH4/ultrachat_200k:train_sft")
    assert src.is_hub and src.hub_split == "train_sft"
    assert src.fingerprint() == {"id": "HuggingFaceH4/ultrachat_200k:train_sft", "kind": "hub", "split": "train_sft",
                                 "files": {}, "sha256": None}


def _bad(tmp_path, case):
    """-> (model_dir, dataset, n, seq_len, text the one-line error must contain)."""
    model = MODEL
    if case == "missing":
        return model, str(tmp_path / "nope.jsonl"), 2, 16, "nope.jsonl"
    if case == "empty":
        (tmp_path / "empty.txt").write_text("")
        return model, str(tmp_path / "empty.txt"), 2, 16, "empty.txt"
    if case == "empty-folder":
        (tmp_path / "dir").mkdir()
        return model, str(tmp_path / "dir"), 2, 16, "dir"
    if case == "no-text-column":
        (tmp_path / "nums.jsonl").write_text("\n".join(json.dumps({"a": i, "b": [i]}) for i in range(10)))
        return model, str(tmp_path / "nums.jsonl"), 2, 16, "nums.jsonl"
    if case == "two-string-columns":
        (tmp_path / "two.jsonl").write_text("\n".join(json.dumps({"q": "x", "a": "y"}) for _ in range(10)))
        return model, str(tmp_path / "two.jsonl"), 2, 16, "two.jsonl"
    if case == "too-few-tokens":
        (tmp_path / "short.txt").write_text("just a few words")
        return model, str(tmp_path / "short.txt"), 4, 64, "short.txt"
    if case == "binary":
        (tmp_path / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary\x00" * 50)
        return model, str(tmp_path / "blob.txt"), 2, 16, "blob.txt"
    if case == "fake-parquet":
        (tmp_path / "x.parquet").write_text("not parquet")
        return model, str(tmp_path / "x.parquet"), 2, 16, "x.parquet"
    if case == "bad-jsonl":
        (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
        return model, str(tmp_path / "broken.jsonl"), 2, 16, "broken.jsonl"
    if case == "unsupported-type":
        (tmp_path / "d.csv").write_text("text\nhello\n")
        return model, str(tmp_path / "d.csv"), 2, 16, "d.csv"
    if case == "no-tokenizer":
        m = tmp_path / "model"
        m.mkdir()
        shutil.copy(MODEL / "config.json", m / "config.json")
        return m, str(FIXTURE_DATA), 2, 16, str(m)
    if case == "chat-without-template":
        m = tmp_path / "model"
        m.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(MODEL / f, m / f)
        cfg = json.loads((m / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (m / "tokenizer_config.json").write_text(json.dumps(cfg))
        (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
        return m, str(tmp_path / "chat.jsonl"), 2, 16, "chat template"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "empty", "empty-folder", "no-text-column", "two-string-columns",
                                  "too-few-tokens", "binary", "fake-parquet", "bad-jsonl", "unsupported-type",
                                  "no-tokenizer", "chat-without-template"])
def test_bad_input_names_the_file(tmp_path, case):
    model, dataset, n, seq_len, needle = _bad(tmp_path, case)
    with pytest.raises(BadInput) as e:
        load_calibration(model, dataset, n=n, seq_len=seq_len)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg


@pytest.mark.parametrize("dataset_id", ["org/chats:train_sft", "org/chats"])
def test_hub_dataset_via_datasets(monkeypatch, dataset_id):
    """The Hub path, offline: `datasets.load_dataset` answers from memory; rows are shuffled with the seed."""
    import datasets

    rows = [{"prompt": f"q{i}", "messages": [{"role": "user", "content": f"question {i}? " + WORDS},
                                             {"role": "assistant", "content": WORDS}]} for i in range(600)]
    calls = []

    def fake_load(repo, split=None):
        calls.append((repo, split))
        ds = datasets.Dataset.from_list(rows)
        return ds if split else datasets.DatasetDict({"train": ds, "test": ds.select(range(2))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    d = load_calibration(MODEL, dataset_id, n=4, seq_len=64, seed=2)
    assert d.ids.shape == (4, 64) and d.dataset["kind"] == "hub" and d.dataset["id"] == dataset_id
    assert calls == [("org/chats", "train_sft" if ":" in dataset_id else None)]
    assert d.tokens_drawn_from < 600 * 40  # stopped tokenizing once it had enough
    assert torch.equal(d.ids, load_calibration(MODEL, dataset_id, n=4, seq_len=64, seed=2).ids)
