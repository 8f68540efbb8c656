"""The data layer: prepare (round trips, every bad input at once, atomic output), TokenData, and the loader
(a pure function of (seed, step) whose shards put together are exactly the global batch)."""

import ast
import hashlib
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lasp.data import DataError, TokenData, epoch_of, global_sample_ids, load_tokenizer, local_microbatches, prepare
from lasp.data.__main__ import main
from lasp.kernels.documents import Documents
from lasp.parallel.batch import local_microbatches as reference_microbatches
from lasp.parallel.config import ParallelConfig
from lasp.sp.layout import unshard_sequence

prepare_mod = importlib.import_module("lasp.data.prepare")  # the module, which `lasp.data.prepare` the function hides

DOCS = ["héllo wörld\n", "second document", "third, from JSONL", "fourth: ✓ unicode"]


def write_corpus(tmp_path: Path) -> list[str]:
    """Two text files and a JSONL file (with a blank line) whose documents, in input order, are DOCS."""
    src = tmp_path / "src"
    src.mkdir()
    for name, doc in zip("ab", DOCS):
        (src / f"{name}.txt").write_text(doc)
    (src / "c.jsonl").write_text(json.dumps({"text": DOCS[2], "id": 1}) + "\n\n" + json.dumps({"text": DOCS[3]}) + "\n")
    return [str(src / "*.txt"), str(src / "c.jsonl")]


def split_docs(data: TokenData, tok) -> list[str]:
    ids = np.asarray(data.tokens)
    assert ids[-1] == data.eos_id
    ends = np.flatnonzero(ids == data.eos_id)
    assert ends.tolist() == (data.doc_offsets[1:] - 1).tolist()
    return [tok.decode(ids[a:b]) for a, b in zip([0, *(ends[:-1] + 1)], ends)]


def test_prepare_round_trip_byte(tmp_path):
    out = tmp_path / "out"
    meta = prepare(write_corpus(tmp_path), out, progress=False)
    data = TokenData(out)
    assert split_docs(data, load_tokenizer("byte")) == DOCS
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["format"] == "lasp-tokens-1" and meta["dtype"] == "uint16" and data.tokens.dtype == np.uint16
    assert meta["tokenizer"] == {"name": "byte", "vocab_size": 257, "eos_id": 256}
    train = meta["splits"]["train"]
    assert train["documents"] == data.num_documents == 4 and "val" not in meta["splits"]
    assert train["tokens"] == data.num_tokens == sum(len(d.encode()) + 1 for d in DOCS)
    assert train["sha256"] == hashlib.sha256((out / "train.bin").read_bytes()).hexdigest()
    assert [Path(s).name for s in meta["sources"]] == ["a.txt", "b.txt", "c.jsonl"]
    data.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary directory left


def test_val_split(tmp_path):
    docs = [f"document number {i}" for i in range(20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = load_tokenizer("byte")
    meta = prepare(str(tmp_path / "d.jsonl"), tmp_path / "a", val_fraction=0.2, seed=3, progress=False)
    train, val = split_docs(TokenData(tmp_path / "a"), tok), split_docs(TokenData(tmp_path / "a", "val"), tok)
    assert len(val) == meta["splits"]["val"]["documents"] == 4 and len(train) == 16
    assert sorted(train + val, key=docs.index) == docs
    assert train == sorted(train, key=docs.index) and val == sorted(val, key=docs.index)  # original order kept
    prepare(str(tmp_path / "d.jsonl"), tmp_path / "b", val_fraction=0.2, seed=3, progress=False)
    assert split_docs(TokenData(tmp_path / "b", "val"), tok) == val  # seeded
    prepare(str(tmp_path / "d.jsonl"), tmp_path / "c", val_fraction=0.001, progress=False)
    assert TokenData(tmp_path / "c", "val").num_documents == 1  # at least one
    prepare(str(tmp_path / "d.jsonl"), tmp_path / "e", val_fraction=0.99, progress=False)
    assert TokenData(tmp_path / "e").num_documents == 1  # at least one left for train
    with pytest.raises(DataError, match="at least 2 documents"):
        prepare(_write(tmp_path / "one.txt", b"x"), tmp_path / "f", val_fraction=0.5, progress=False)


def hf_tokenizer(path: Path, with_eos: bool, extra_words: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, **{f"w{i}": 3 + i for i in range(extra_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_eos:
        tok.add_special_tokens(["<pad>", "</s>"])
    tok.save(str(path))
    return path


@pytest.mark.parametrize("with_eos", [True, False], ids=["own-eos", "appended-eos"])
def test_prepare_round_trip_hf(tmp_path, with_eos):
    path = hf_tokenizer(tmp_path / "tokenizer.json", with_eos)
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n{"text": "world hello hello"}\n')
    meta = prepare(str(tmp_path / "d.jsonl"), tmp_path / "out", tokenizer=str(path), progress=False)
    tok = load_tokenizer(str(path))
    assert (desc := meta["tokenizer"]) == tok.describe() and desc["eos_added"] is not with_eos
    assert desc["path"] == str(path.resolve()) and desc["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tok.eos_id, tok.vocab_size) == ((4, 5) if with_eos else (3, 4))
    data = TokenData(tmp_path / "out")
    assert data.tokens.tolist() == [1, 2, tok.eos_id, 2, 1, 1, tok.eos_id]
    assert split_docs(data, tok) == ["hello world", "world hello hello"]


def test_large_vocab_uses_uint32(tmp_path):
    path = hf_tokenizer(tmp_path / "tokenizer.json", with_eos=False, extra_words=70_000)
    (tmp_path / "a.txt").write_text("hello w69999 world")
    meta = prepare(str(tmp_path / "a.txt"), tmp_path / "out", tokenizer=str(path), progress=False)
    assert meta["dtype"] == "uint32" and meta["tokenizer"]["eos_id"] == 70_003
    assert TokenData(tmp_path / "out").tokens.tolist() == [1, 70_002, 2, 70_003]


BAD = {
    "missing": (lambda d: str(d / "missing.txt"), ["missing.txt: no such file"]),
    "glob": (lambda d: str(d / "*.md"), ["*.md: no file matches"]),
    "empty": (lambda d: _write(d / "empty.txt", b""), ["empty.txt: is empty"]),
    "blank-jsonl": (lambda d: _write(d / "blank.jsonl", b"\n  \n"), ["blank.jsonl: has no documents"]),
    "not-utf8": (lambda d: _write(d / "latin.txt", b"ok\ncaf\xe9\n"), ["latin.txt: not UTF-8", "offset 6", "line 2"]),
    "bad-json": (lambda d: _write(d / "j.jsonl", b'{"text": "a"}\n{"text": \n'), ["j.jsonl:2: not valid JSON"]),
    "no-text": (lambda d: _write(d / "t.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n'), ['t.jsonl:3: no "text" field']),
    "text-not-str": (lambda d: _write(d / "n.jsonl", b'{"text": 5}\n'), ['n.jsonl:1: "text" is not a string']),
    "surrogate": (lambda d: _write(d / "s.jsonl", b'{"text": "\\ud800"}\n'), ['s.jsonl:1: "text" has an invalid']),
}


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_every_bad_input_named_in_one_error_and_nothing_written(tmp_path):
    inputs = [_write(tmp_path / "good.txt", b"fine")] + [make(tmp_path) for make, _ in BAD.values()]
    with pytest.raises(DataError) as err:
        prepare(inputs, tmp_path / "out", tokenizer=str(tmp_path / "tok.json"), val_fraction=1.5, progress=False)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 + len(BAD) + 2  # header, one per bad input, the tokenizer, the val fraction
    for case, (_, fragments) in BAD.items():
        assert any(all(f in line for f in fragments) for line in lines), case
    assert any("tok.json' does not exist" in line for line in lines) and any("1.5" in line for line in lines)
    assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_existing_output_needs_force(tmp_path, capsys):
    a, b = _write(tmp_path / "a.txt", b"first"), _write(tmp_path / "b.txt", b"second")
    prepare(a, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="--force"):
        prepare(b, tmp_path / "out", progress=False)
    assert split_docs(TokenData(tmp_path / "out"), load_tokenizer()) == ["first"]
    capsys.readouterr()
    prepare(b, tmp_path / "out", force=True, progress=False)
    assert split_docs(TokenData(tmp_path / "out"), load_tokenizer()) == ["second"]
    removed = capsys.readouterr().err  # said, in one line
    assert removed == (
        f"removed the previous {tmp_path / 'out'}: 3 file(s), 0.0 MB (meta.json, train.bin, train.docs.npy)\n"
    )
    (tmp_path / "empty").mkdir()
    prepare(a, tmp_path / "empty", progress=False)  # an empty directory is no loss
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "empty", "out"]


def test_force_replaces_only_a_dataset_and_never_its_inputs(tmp_path):
    """--force over a run directory, over a dataset that holds more than prepare wrote, or over a directory
    holding the inputs is refused (exit 2 from the CLI), and the directory is left as it was."""
    from tests.refusals import tree

    src = _write(tmp_path / "a.txt", b"some text")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run / "checkpoints" / "step-00000004" / "COMMITTED").write_text("{}")
    (run / "config.yaml").write_text("data: {}\n")
    prepare(src, tmp_path / "data", progress=False)
    (tmp_path / "data" / "notes.md").write_text("mine")
    prepare(src, tmp_path / "inside" / "data", progress=False)
    inner = _write(tmp_path / "inside" / "data" / "more.txt", b"an input kept in the dataset")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{not json")
    cases = {
        run: f"{run} is not empty and has no meta.json (it holds checkpoints/, config.yaml): --force replaces only "
        "a dataset made by lasp.data prepare",
        tmp_path / "data": f"{tmp_path / 'data'} is a dataset made by lasp.data prepare but also holds what the "
        "tool did not write (notes.md)",
        tmp_path / "inside": f"{tmp_path / 'inside'} holds the input {inner}",
        tmp_path / "bad": "its meta.json cannot be read as prepare's (JSONDecodeError(",
    }
    before = tree(tmp_path)
    for out, says in cases.items():
        with pytest.raises(DataError) as e:
            prepare([src, inner], out, force=True, progress=False)
        assert says in str(e.value)
    assert tree(tmp_path) == before  # nothing removed, nothing written


def test_crash_leaves_no_complete_looking_output(tmp_path, monkeypatch):
    docs = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50))
    src = _write(tmp_path / "d.jsonl", docs.encode())
    prepare(_write(tmp_path / "old.txt", b"old"), tmp_path / "old", progress=False)
    real_add = prepare_mod.SplitWriter.add

    def failing_add(self, ids):
        if self.offsets[-1] > 40:
            raise RuntimeError("disk on fire")
        real_add(self, ids)
        self.flush()  # so a partial train.bin is on disk when it fails

    monkeypatch.setattr(prepare_mod.SplitWriter, "add", failing_add)
    for out, force in ((tmp_path / "new", False), (tmp_path / "old", True)):
        with pytest.raises(RuntimeError, match="disk on fire"):
            prepare(src, out, force=force, progress=False)
    assert not (tmp_path / "new").exists()
    assert split_docs(TokenData(tmp_path / "old"), load_tokenizer()) == ["old"]  # the old one untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "old", "old.txt"]


def test_token_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        TokenData(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"no meta.json.*python -m lasp.data prepare"):
        TokenData(tmp_path / "plain")
    out = tmp_path / "out"
    prepare(_write(tmp_path / "a.txt", b"some text to tokenize"), out, progress=False)
    with pytest.raises(DataError, match="no split 'val'; available: train"):
        TokenData(out, "val")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format": "other-9"}))
    with pytest.raises(DataError, match="unknown format 'other-9'"):
        TokenData(out)
    (out / "meta.json").write_text(json.dumps(meta))
    bin_bytes = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(bin_bytes[:-2])
    with pytest.raises(DataError, match=r"train.bin: wrong size, expected 44 bytes .* found 42 bytes \(truncated\)"):
        TokenData(out)
    (out / "train.bin").write_bytes(b"\0\0" + bin_bytes[2:])
    with pytest.raises(DataError, match="checksum mismatch"):
        TokenData(out).verify()
    (out / "train.bin").unlink()
    with pytest.raises(DataError, match="train.bin: token file of split 'train' is missing"):
        TokenData(out)


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_changed_token_file_is_refused_by_its_hash_or_its_sampled_blocks(tmp_path, monkeypatch):
    dataset = importlib.import_module("lasp.data.dataset")
    monkeypatch.setattr(dataset, "SAMPLE_BLOCKS", 4)  # 4 blocks of 8 bytes, so a small file is sampled
    monkeypatch.setattr(dataset, "SAMPLE_BLOCK_BYTES", 8)
    out = tmp_path / "out"
    prepare(_write(tmp_path / "a.txt", bytes(range(32, 127)) * 3), out, progress=False)
    assert dataset.dataset_problems(out, ["train"]) == []
    raw = (out / "train.bin").read_bytes()  # 286 tokens, 572 bytes: blocks at 0, 188, 376 and 564
    meta = json.loads((out / "meta.json").read_text())
    recorded = meta["splits"]["train"]

    def changed_at(offset: int) -> list[str]:
        (out / "train.bin").write_bytes(raw[:offset] + bytes([raw[offset] ^ 1]) + raw[offset + 1 :])
        return dataset.dataset_problems(out, ["train"])

    whole = changed_at(100)  # at most FULL_HASH_BYTES: the whole file is hashed
    assert whole == [
        f"{out / 'train.bin'}: checksum mismatch: sha256 {file_sha(out / 'train.bin')}, meta.json records "
        f"{recorded['sha256']} (the file changed after prepare: prepare the directory again)"
    ]
    monkeypatch.setattr(dataset, "FULL_HASH_BYTES", 64)  # larger splits: the sampled blocks
    sampled = changed_at(190)
    assert len(sampled) == 1 and "checksum mismatch: sampled-block sha256 " in sampled[0]
    assert recorded["sample_sha256"] in sampled[0]
    assert changed_at(100) == []  # between the blocks: what sampling gives up above FULL_HASH_BYTES
    del recorded["sample_sha256"]  # a directory prepared before sampled digests: hashed whole, whatever its size
    (out / "meta.json").write_text(json.dumps(meta))
    assert "checksum mismatch: sha256 " in changed_at(100)[0]
    (out / "train.bin").write_bytes(raw)
    assert dataset.dataset_problems(out, ["train"]) == []


def test_damaged_files_are_one_line_each_naming_the_file(tmp_path):
    dataset = importlib.import_module("lasp.data.dataset")
    docs = "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(10))
    out = tmp_path / "out"
    meta = prepare(_write(tmp_path / "d.jsonl", docs.encode()), out, val_fraction=0.3, progress=False)
    assert dataset.dataset_problems(out, ["train", "val"]) == []
    n = meta["splits"]["train"]["tokens"]
    (out / "train.bin").write_bytes((out / "train.bin").read_bytes()[:-1])
    (out / "val.docs.npy").write_bytes(b"\x93NUMPY garbage")
    train, val = dataset.dataset_problems(out, ["train", "val"])  # every problem, one line each
    assert train == (
        f"{out / 'train.bin'}: wrong size, expected {2 * n} bytes ({n} uint16 tokens), found {2 * n - 1} "
        "bytes (truncated, not a whole number of uint16 tokens)"
    )
    assert val.startswith(f"{out / 'val.docs.npy'}: document offsets of split 'val' are damaged (") and "\n" not in val
    (out / "val.bin").unlink()
    assert dataset.dataset_problems(out, ["val"]) == [f"{out / 'val.bin'}: token file of split 'val' is missing"]
    del meta["dtype"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert dataset.dataset_problems(out, ["train", "val"]) == [
        f"{out / 'meta.json'}: damaged or incomplete, KeyError('dtype') (prepare the directory again)"
    ]
    (out / "meta.json").write_text('{"format": ')
    [broken] = dataset.dataset_problems(out, ["train", "val"])  # one problem, not one per split
    assert broken.startswith(f"{out / 'meta.json'}: cannot be read as JSON (")


def test_sampler_is_a_pure_function_of_seed_and_step():
    a = global_sample_ids(seed=1, step=5, global_batch=8, num_samples=100)
    assert a.dtype == np.int64 and np.array_equal(a, global_sample_ids(1, 5, 8, 100))
    assert not np.array_equal(a, global_sample_ids(1, 6, 8, 100))
    assert not np.array_equal(a, global_sample_ids(2, 5, 8, 100))
    # 10 samples, 4 per step: step 2 straddles epochs 0 and 1; each epoch covers every sample once
    seq = np.concatenate([global_sample_ids(7, s, 4, 10) for s in range(5)])
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:]) == list(range(10))
    assert not np.array_equal(seq[:10], seq[10:])
    assert global_sample_ids(7, 2, 4, 10, shuffle=False).tolist() == [8, 9, 0, 1]
    assert global_sample_ids(0, 0, 5, 2, shuffle=False).tolist() == [0, 1, 0, 1, 0]
    assert epoch_of(5, 4, 10) == 2.0


@pytest.fixture(scope="module")
def random_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("random")
    text = np.random.default_rng(0).integers(32, 127, size=2000, dtype=np.uint8).tobytes()
    prepare(_write(d / "r.txt", text), d / "out", progress=False)
    return TokenData(d / "out")


class ReadSpy:
    """Stands in for TokenData.tokens and counts the tokens read through it."""

    def __init__(self, tokens):
        self.tokens, self.read = tokens, 0

    def __getitem__(self, index):
        out = self.tokens[index]
        self.read += np.size(out)
        return out


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("dp,sp", [(1, 2), (2, 1), (2, 2)], ids=["dp1xsp2", "dp2xsp1", "dp2xsp2"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_rank_shards_are_the_global_batch(random_data, layout, dp, sp, microbatches):
    seq_len, batch = 12, 4
    cfg = ParallelConfig(dp=dp, sp=sp, sp_layout=layout, microbatches=microbatches)
    spy = ReadSpy(random_data.tokens)
    data = SimpleNamespace(tokens=spy, num_tokens=random_data.num_tokens, num_samples=random_data.num_samples)
    kw = dict(seq_len=seq_len, global_batch=batch, microbatches=microbatches, seed=11, dp=dp, sp=sp, layout=layout)
    for step in (0, 3, 500):  # 500: past the first epoch of 166 samples
        ids = global_sample_ids(11, step, batch, random_data.num_samples(seq_len))
        full = torch.from_numpy(np.stack([random_data.sample(int(i), seq_len) for i in ids]))  # [B, N+1]
        parts = {}
        for dp_rank in range(dp):
            for sp_rank in range(sp):
                spy.read = 0
                mbs = local_microbatches(data, **kw, step=step, dp_rank=dp_rank, sp_rank=sp_rank)
                rows, chunks = batch // dp, (2 if layout == "zigzag" and sp > 1 else 1)
                assert spy.read == rows * chunks * (seq_len // sp // chunks + 1)  # its chunks and one label each
                ref = reference_microbatches(full, cfg, SimpleNamespace(dp_rank=dp_rank, sp_rank=sp_rank))
                assert len(mbs) == len(ref) == microbatches
                for mine, theirs in zip(mbs, ref):
                    for key in ("tokens", "positions", "labels"):
                        assert mine[key].dtype == torch.int64
                        assert mine[key].shape == (batch // dp // microbatches, seq_len // sp)
                        assert torch.equal(mine[key], theirs[key]), (key, dp_rank, sp_rank)
                parts[dp_rank, sp_rank] = {k: torch.cat([m[k] for m in mbs]) for k in mbs[0]}
        for key, want in (("tokens", full[:, :-1]), ("labels", full[:, 1:]), ("positions", torch.arange(seq_len))):
            rows = [unshard_sequence([parts[d, s][key] for s in range(sp)], layout=layout) for d in range(dp)]
            assert torch.equal(torch.cat(rows), want.expand(batch, seq_len))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_documents_from_eos_are_the_global_rows_on_every_rank(layout):
    """With eos_id, every SP rank of a row gets the same GLOBAL documents (read from the whole row) and its
    shard of the in-document positions; the same as lasp.parallel.batch on the full windows."""
    toks = np.random.default_rng(1).integers(0, 5, size=600).astype(np.int64)  # eos_id 0: short documents
    data = SimpleNamespace(tokens=toks, num_tokens=600, num_samples=lambda L: (600 - 1) // L)
    seq_len, batch, dp, sp = 16, 4, 2, 2
    cfg = ParallelConfig(dp=dp, sp=sp, sp_layout=layout, microbatches=2)
    ids = global_sample_ids(3, 5, batch, data.num_samples(seq_len))
    full = torch.from_numpy(np.stack([toks[i * seq_len : (i + 1) * seq_len + 1] for i in ids]))
    for dp_rank in range(dp):
        shards = []
        for sp_rank in range(sp):
            mbs = local_microbatches(
                data,
                seq_len=seq_len,
                global_batch=batch,
                microbatches=2,
                seed=3,
                step=5,
                dp_rank=dp_rank,
                dp=dp,
                sp_rank=sp_rank,
                sp=sp,
                layout=layout,
                eos_id=0,
            )
            ref = reference_microbatches(full, cfg, SimpleNamespace(dp_rank=dp_rank, sp_rank=sp_rank), eos_id=0)
            for mine, theirs in zip(mbs, ref):
                assert mine["documents"].starts == theirs["documents"].starts
                for key in ("tokens", "positions", "labels"):
                    assert torch.equal(mine[key], theirs[key]), (key, dp_rank, sp_rank)
            shards.append(torch.cat([m["positions"] for m in mbs]))
        rows = full[dp_rank * 2 : dp_rank * 2 + 2, :-1]
        docs = Documents.from_eos(rows, 0)
        assert len(docs.starts[0]) > 2 and all(rows[b, s - 1] == 0 for b, r in enumerate(docs.starts) for s in r[1:])
        assert torch.equal(unshard_sequence(shards, layout=layout), docs.positions())


def test_loader_errors_name_the_values(random_data):
    kw = dict(seed=0, step=0, dp_rank=2, dp=2, sp_rank=0, sp=2, layout="zigzag")
    with pytest.raises(ValueError) as err:
        local_microbatches(random_data, seq_len=6, global_batch=6, microbatches=2, **kw)
    msg = str(err.value)
    assert "dp_rank 2 is outside 0..1" in msg
    assert "seq_len 6 is not divisible by the 4 chunks of the zigzag layout" in msg
    assert "global_batch 6 is not divisible by dp x microbatches = 2 x 2" in msg
    with pytest.raises(ValueError, match="has 2001 tokens: too few for one sample of seq_len 4000"):
        local_microbatches(random_data, seq_len=4000, global_batch=1, microbatches=1, **{**kw, "dp_rank": 0})


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["prepare", "--input", str(tmp_path / "gone.txt"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "\nerror: cannot prepare" in "\n" + err and "gone.txt: no such file" in err and "Traceback" not in err
    _write(tmp_path / "a.txt", b"abc")
    args = ["prepare", "--input", str(tmp_path / "*.txt"), "--output", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train: 1 documents, 4 tokens" in out and "val: none, as --val-fraction is 0" in out  # said, not silent


def test_data_imports_only_the_layout():
    for path in (Path(__file__).parent.parent / "lasp" / "data").glob("*.py"):
        nodes = list(ast.walk(ast.parse(path.read_text())))
        names = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 0}
        names |= {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
        bad = {
            m
            for m in names
            if m.split(".")[0] == "lasp"
            and not m.startswith(("lasp.data", "lasp.sp.layout", "lasp.cli", "lasp.kernels.documents"))
        }
        assert not bad, f"{path.name} imports {bad}"
