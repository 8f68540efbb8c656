"""A prepared token directory, memory-mapped: the tokens of one split are read straight from disk, and only
the pages a rank touches are ever loaded.

Identity: meta.json records each split's sha256 and, since sampled digests, `sample_sha256` (the sha256 of
its size and SAMPLE_BLOCKS blocks at fixed offsets). `TokenData.verify` hashes a split of at most
FULL_HASH_BYTES whole (sha256 runs at about 1 GB/s on one core: about 1 s), a larger one by its
sampled blocks (64 MiB read whatever the size), and an older directory without sampled digests whole.
"""

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from lasp.data.tokenizer import DataError, directory_tokenizer, file_sha256, tokenizer_problems

FORMAT = "lasp-tokens-1"
PREPARE_HINT = "python -m lasp.data prepare --input FILES --output {path}"
META_FIELDS = ("format", "tokenizer", "dtype", "splits", "sources")
"""What `prepare` writes into every meta.json: a directory whose meta.json has them is a prepared dataset."""
OWN = "a dataset made by lasp.data prepare"
FULL_HASH_BYTES = 1 << 30
"""A split up to this size is checked by its whole sha256 (about 1 s); a larger one by its sampled blocks."""
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 1 << 20


def sample_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's size and of SAMPLE_BLOCKS blocks of SAMPLE_BLOCK_BYTES at evenly spaced
    offsets (the first and the last block included; a small file is read whole): any other file of the same
    size is told apart unless it differs from this one only between the blocks."""
    size = os.path.getsize(path)
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
            h.update(f.read())
            return h.hexdigest()
        for i in range(SAMPLE_BLOCKS):
            f.seek(i * (size - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


def dataset_files(path: Path) -> set[str] | str:
    """The names `prepare` wrote into the directory `path`, from its meta.json; or why it is not a prepared
    dataset, as the rest of a sentence about it (what `--force` may replace: lasp.cli.new_directory)."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        return "has no meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        missing = [k for k in META_FIELDS if k not in meta]
        if meta.get("format") != FORMAT or missing:
            return f"its meta.json is not prepare's (format {meta.get('format')!r}, not {FORMAT!r}" + (
                f"; no {', '.join(missing)})" if missing else ")"
            )
        names = {"meta.json"}
        for name, split in meta["splits"].items():
            names |= {split["file"], split.get("docs_file", f"{name}.docs.npy")}
        return names
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        return f"its meta.json cannot be read as prepare's ({e!r})"


class TokenData:
    """One split of a directory written by `python -m lasp.data prepare`.

    Sample i of length seq_len is the window tokens[i*seq_len : i*seq_len + seq_len + 1]: its inputs are the
    first seq_len tokens, its labels the last seq_len. Windows share their boundary token and cross documents
    (the stream is packed: doc0 EOS doc1 EOS ...).
    """

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.split = split
        meta_path = self.path / "meta.json"
        if not self.path.is_dir():
            raise DataError(f"{self.path}: no such directory; create it with `{PREPARE_HINT.format(path=self.path)}`")
        if not meta_path.is_file():
            raise DataError(
                f"{self.path} is not a prepared token directory (no meta.json); "
                f"create it with `{PREPARE_HINT.format(path=self.path)}`"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{meta_path}: cannot be read as JSON ({e})") from e
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            found = self.meta.get("format") if isinstance(self.meta, dict) else None
            raise DataError(f"{meta_path}: unknown format {found!r}, expected {FORMAT!r}")
        splits = self.meta.get("splits")
        if not isinstance(splits, dict) or split not in splits:
            have = ", ".join(sorted(splits)) if isinstance(splits, dict) else ""
            raise DataError(f"{self.path} has no split {split!r}; available: {have or 'none'}")
        try:
            self.info = splits[split]
            self.dtype = np.dtype(self.meta["dtype"])
            self.vocab_size = int(self.meta["tokenizer"]["vocab_size"])
            self.eos_id = int(self.meta["tokenizer"]["eos_id"])
            self.num_tokens = int(self.info["tokens"])
            self.num_documents = int(self.info["documents"])
            self.bin_path = self.path / self.info["file"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{meta_path}: damaged or incomplete, {e!r} (prepare the directory again)") from None
        if not self.bin_path.is_file():
            raise DataError(f"{self.bin_path}: token file of split {split!r} is missing")
        expected, actual = self.num_tokens * self.dtype.itemsize, os.path.getsize(self.bin_path)
        if actual != expected:
            whole = "" if actual % self.dtype.itemsize == 0 else f", not a whole number of {self.dtype.name} tokens"
            raise DataError(
                f"{self.bin_path}: wrong size, expected {expected} bytes ({self.num_tokens} {self.dtype.name} "
                f"tokens), found {actual} bytes ({'truncated' if actual < expected else 'too long'}{whole})"
            )
        try:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        except (OSError, ValueError) as e:  # an empty file cannot be mapped; an unreadable one cannot be opened
            tokens = f"{self.num_tokens} {self.dtype.name} tokens"
            raise DataError(f"{self.bin_path}: cannot be read as {tokens} ({e})") from None
        """The split's token stream, 1-D [num_tokens], read-only."""

    @cached_property
    def doc_offsets(self) -> np.ndarray:
        """int64 [num_documents + 1]: document d is tokens[offsets[d] : offsets[d+1]] (its EOS included)."""
        path = self.path / self.info.get("docs_file", f"{self.split}.docs.npy")
        if not path.is_file():
            raise DataError(f"{path}: document offsets of split {self.split!r} are missing")
        try:
            offsets = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: document offsets of split {self.split!r} are damaged ({e})") from None
        if offsets.shape != (self.num_documents + 1,) or (len(offsets) and offsets[-1] != self.num_tokens):
            counts = f"{self.num_documents} documents, {self.num_tokens} tokens"
            raise DataError(f"{path}: does not match meta.json ({counts})")
        return offsets

    def verify(self) -> None:
        """Check that the token file holds the bytes prepare wrote (see the module doc): its whole sha256 up to
        FULL_HASH_BYTES or without a sampled digest in meta.json, else its `sample_sha256`. Raises DataError
        naming the file and both digests."""
        sampled = self.info.get("sample_sha256")
        if os.path.getsize(self.bin_path) > FULL_HASH_BYTES and sampled:
            what, expected, actual = "sampled-block sha256", sampled, sample_sha256(self.bin_path)
        else:
            what, expected, actual = "sha256", self.info.get("sha256"), file_sha256(self.bin_path)
        if expected is not None and actual != expected:
            raise DataError(
                f"{self.bin_path}: checksum mismatch: {what} {actual}, meta.json records {expected} "
                "(the file changed after prepare: prepare the directory again)"
            )

    def num_samples(self, seq_len: int) -> int:
        """How many whole windows of seq_len + 1 tokens (overlapping by one) the split holds."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        return max(0, (self.num_tokens - 1) // seq_len)

    def sample(self, i: int, seq_len: int) -> np.ndarray:
        """int64 [seq_len + 1]: the window of sample i (inputs = [:-1], labels = [1:])."""
        n = self.num_samples(seq_len)
        if not 0 <= i < n:
            raise IndexError(f"sample {i} is outside the {n} samples of length {seq_len} in {self.path} ({self.split})")
        return np.asarray(self.tokens[i * seq_len : (i + 1) * seq_len + 1], dtype=np.int64)

    def __repr__(self) -> str:
        return f"TokenData({str(self.path)!r}, split={self.split!r}, tokens={self.num_tokens}, vocab={self.vocab_size})"


def dataset_problems(path: str | Path, splits: list[str]) -> list[str]:
    """What is wrong with the prepared directory `path` for reading `splits`: a missing, damaged, truncated or
    changed file (checksums as `TokenData.verify`), one line each naming the file. [] when all is well."""
    problems = []
    for split in splits:
        try:
            data = TokenData(path, split)
            data.doc_offsets  # noqa: B018 - read and checked against meta.json
            data.verify()
        except DataError as e:
            problems.append(str(e))
        except OSError as e:
            problems.append(f"{e.filename or path}: cannot be read ({e.strerror or e})")
    return list(dict.fromkeys(problems))  # a damaged meta.json is one problem, not one per split


def tokenizer_against(path: str | Path, source: str, recorded: dict | None) -> list[str]:
    """The tokenizer of the prepared directory `path` against that of the model directory `source` (what
    train.init_from starts from): `recorded` (a LASP export's, lasp.model.pretrained.recorded_tokenizer), else
    the directory's own tokenizer.json (a Hugging Face model's). One line naming both when they differ; []
    when they agree, or when `source` records no tokenizer (then only vocabulary sizes can be compared)."""
    try:
        data = json.loads((Path(path) / "meta.json").read_text())["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):  # the data checks report an unreadable meta.json
        return []
    found = recorded if recorded is not None else directory_tokenizer(source)
    return tokenizer_problems(data, found, f"data.path {path}", f"train.init_from {source}")
