"""`prepare`: text and JSONL files -> packed token streams, document offsets and meta.json in one directory.

Layout of a prepared directory (format `lasp-tokens-1`):
    train.bin, val.bin          tokens, flat uint16 (vocab <= 65536) or uint32: doc0 EOS doc1 EOS ...
    train.docs.npy, ...         int64 [documents + 1]: where each document starts; the last is the token count
    meta.json                   tokenizer, dtype, per-split counts, sha256 and sampled-block sha256
                                (lasp.data.dataset.sample_sha256), sources; written last

Every input is checked before anything is written, and every problem is reported in one DataError. The
directory is built beside its destination and renamed into place when complete, so a crash never leaves a
directory that looks prepared. An existing output is replaced only with `force`, only when it is a
dataset prepare made (its meta.json says so, and it holds nothing else), never when it holds an input.
"""

import glob
import hashlib
import json
import os
import shutil
import sys
from array import array
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lasp.cli import install_directory, new_directory
from lasp.data.dataset import FORMAT, OWN, dataset_files, sample_sha256
from lasp.data.tokenizer import DataError, load_tokenizer

MAX_PROBLEMS_PER_FILE = 20  # a file with thousands of bad lines reports this many and a count of the rest


@dataclass
class Source:
    """A checked input file: its size in bytes (for the progress bar) and how many documents it holds."""

    path: Path
    jsonl: bool
    size: int
    documents: int


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Paths and globs -> (files in the order given, each glob sorted, duplicates dropped; problems)."""
    files, problems, seen = [], [], set()
    for spec in inputs:
        spec, matches = os.path.expanduser(str(spec)), []
        if glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches and os.path.isfile(spec):  # a file whose name only looks like a glob ("a[1].txt")
                matches = [spec]
            if not matches:
                problems.append(f"{spec}: no file matches this pattern")
        elif os.path.isdir(spec):
            problems.append(f"{spec}: is a directory (give its files, e.g. a quoted glob '{spec}/*.txt')")
        elif not os.path.exists(spec):
            problems.append(f"{spec}: no such file")
        else:
            matches = [spec]
        for m in matches:
            key = os.path.realpath(m)
            if key not in seen:
                seen.add(key)
                files.append(Path(m))
    return files, problems


def own_inputs(files: list[Path], tokenizer: str) -> list[str | Path]:
    """What prepare reads, which its output must not be, hold or lie inside: the input files and the
    tokenizer (a tokenizer.json, or a model directory holding one)."""
    return [*files, *([tokenizer] if tokenizer != "byte" else [])]


def _check_jsonl_line(raw: bytes) -> str | None:
    """What is wrong with one non-blank JSONL line, or None."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"not UTF-8 at byte {e.start} of the line: {e.reason}"
    except json.JSONDecodeError as e:
        return f"not valid JSON: {e.msg} (column {e.colno})"
    if not isinstance(obj, dict) or "text" not in obj:
        return 'no "text" field (each line must be an object like {"text": "..."})'
    if not isinstance(obj["text"], str):
        return f'"text" is not a string (got {type(obj["text"]).__name__})'
    try:
        obj["text"].encode("utf-8")
    except UnicodeEncodeError as e:  # valid JSON can escape a lone surrogate, which no tokenizer can take
        return f'"text" has an invalid character at {e.start}: {e.reason}'
    return None


def check_file(path: Path) -> tuple[Source | None, list[str]]:
    """Read one input completely and say what is wrong with it; the Source when nothing is."""
    jsonl = path.suffix.lower() == ".jsonl"
    problems, docs, bad = [], 0, 0
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if not jsonl:
                docs, data = 1, f.read()
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as e:
                    line = data.count(b"\n", 0, e.start) + 1
                    problems.append(f"{path}: not UTF-8 text at byte offset {e.start} (line {line}): {e.reason}")
            else:
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    docs += 1
                    if (why := _check_jsonl_line(raw)) is not None:
                        bad += 1
                        if bad <= MAX_PROBLEMS_PER_FILE:
                            problems.append(f"{path}:{lineno}: {why}")
    except OSError as e:
        return None, [f"{path}: cannot read ({e.strerror or e})"]
    if bad > MAX_PROBLEMS_PER_FILE:
        problems.append(f"{path}: ... and {bad - MAX_PROBLEMS_PER_FILE} more bad lines")
    if size == 0:
        return None, [f"{path}: is empty"]
    if jsonl and docs == 0:
        return None, [f"{path}: has no documents (only blank lines)"]
    return (None if problems else Source(path, jsonl, size, docs)), problems


def iter_documents(src: Source):
    """Yield (text, bytes it took in the file) for each document of an already checked source."""
    with open(src.path, "rb") as f:
        if not src.jsonl:
            yield f.read().decode("utf-8"), src.size
            return
        for raw in f:
            if raw.strip():
                yield json.loads(raw)["text"], len(raw)


def choose_val(num_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """bool [num_documents]: True for the round(F * n) documents (at least 1, at most n - 1) that go to val."""
    mask = np.zeros(num_documents, dtype=bool)
    if val_fraction > 0:
        k = min(max(1, round(val_fraction * num_documents)), num_documents - 1)
        mask[np.random.default_rng(seed).choice(num_documents, size=k, replace=False)] = True
    return mask


class SplitWriter:
    """Streams one split's tokens to `{split}.bin` in pieces, hashing as it goes, and records document starts."""

    def __init__(self, directory: Path, split: str, dtype, eos_id: int, flush_tokens: int = 1 << 22):
        self.split, self.dtype, self.flush_tokens = split, np.dtype(dtype), flush_tokens
        self.eos = np.array([eos_id], dtype=np.int64)
        self.bin_path = directory / f"{split}.bin"
        self.docs_path = directory / f"{split}.docs.npy"
        self.file = open(self.bin_path, "wb")
        self.sha = hashlib.sha256()
        self.offsets = array("q", [0])  # 8 bytes per document, not a Python int each
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        """Append one document (int ids [n]) followed by EOS."""
        self.pending += [ids, self.eos]
        self.pending_tokens += len(ids) + 1
        self.offsets.append(self.offsets[-1] + len(ids) + 1)
        if self.pending_tokens >= self.flush_tokens:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            buf = np.concatenate(self.pending).astype(self.dtype).tobytes()
            self.file.write(buf)
            self.sha.update(buf)
            self.pending, self.pending_tokens = [], 0

    def close(self) -> dict:
        """Finish the files; the split's entry for meta.json."""
        self.flush()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        np.save(self.docs_path, np.frombuffer(self.offsets, dtype=np.int64))
        return {
            "file": self.bin_path.name,
            "docs_file": self.docs_path.name,
            "tokens": int(self.offsets[-1]),
            "documents": len(self.offsets) - 1,
            "sha256": self.sha.hexdigest(),
            "sample_sha256": sample_sha256(self.bin_path),  # 64 MiB read back at most, from the page cache
        }


def _batches(sources: list[Source], max_docs: int = 256, max_chars: int = 1 << 22):
    """Documents in order, grouped so a batched tokenizer gets work without holding the corpus."""
    batch, chars, nbytes = [], 0, 0
    for src in sources:
        for text, size in iter_documents(src):
            batch.append(text)
            chars, nbytes = chars + len(text), nbytes + size
            if len(batch) >= max_docs or chars >= max_chars:
                yield batch, nbytes
                batch, chars, nbytes = [], 0, 0
    if batch:
        yield batch, nbytes


def write_splits(directory: Path, sources: list[Source], tok, val_mask: np.ndarray, dtype, progress: bool) -> dict:
    """Tokenize every document into its split's files under `directory`; the meta.json entry per split."""
    names = ["train", "val"] if val_mask.any() else ["train"]
    total = sum(s.size for s in sources)
    with ExitStack() as stack:
        writers = {n: SplitWriter(directory, n, dtype, tok.eos_id) for n in names}
        for w in writers.values():
            stack.callback(w.file.close)
        bar = stack.enter_context(
            tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr, disable=not progress)
        )
        doc = 0
        for texts, nbytes in _batches(sources):
            for ids in tok.encode_arrays(texts):
                writers["val" if val_mask[doc] else "train"].add(ids)
                doc += 1
            bar.update(nbytes)
        return {n: w.close() for n, w in writers.items()}


def prepare(
    inputs: list[str] | str,
    output: str | Path,
    tokenizer: str = "byte",
    val_fraction: float = 0.0,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` (paths or globs; *.jsonl: one {"text": ...} per line, else one document per file)
    into the directory `output`. Raises DataError listing every problem before writing anything.
    Returns the metadata written to `output/meta.json`."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    output = Path(os.path.abspath(output))  # `.` and `dir/` need a name for the sibling temp directory
    problems, tok = [], None
    try:
        tok = load_tokenizer(tokenizer)
    except DataError as e:
        problems.append(str(e))
    if not 0 <= val_fraction < 1:
        problems.append(f"val fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        problems.append(f"seed must be >= 0, got {seed}")
    files, found = expand_inputs(inputs)
    problems += found if inputs else ["no inputs given"]
    problems += new_directory("--output", output, force, dataset_files, OWN, own_inputs(files, tokenizer))
    sources = []
    for path in tqdm(files, desc="checking", unit="file", file=sys.stderr, disable=not progress):
        src, found = check_file(path)
        problems += found
        sources += [src] if src else []
    num_docs = sum(s.documents for s in sources)
    if val_fraction > 0 and num_docs < 2 and len(sources) == len(files):
        problems.append(f"a val split needs at least 2 documents, the inputs have {num_docs}")
    if problems:
        raise DataError(f"cannot prepare {output}:\n  " + "\n  ".join(problems))

    val_mask = choose_val(num_docs, val_fraction, seed)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        splits = write_splits(tmp, sources, tok, val_mask, dtype, progress)
        meta = {
            "format": FORMAT,
            "tokenizer": tok.describe(),
            "dtype": np.dtype(dtype).name,
            "splits": splits,
            "sources": [str(s.path.resolve()) for s in sources],
            "val_fraction": val_fraction,
            "seed": seed,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # meta.json last: a directory without it is not a prepared directory
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        removed = install_directory(tmp, output)
        if removed:
            print(removed, file=sys.stderr)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
