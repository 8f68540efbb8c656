"""A prepared token directory, memory-mapped: the tokens of one split are read straight from disk, and only
the pages a rank touches are ever loaded."""

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from lasp.data.tokenizer import DataError, file_sha256

FORMAT = "lasp-tokens-1"
PREPARE_HINT = "python -m lasp.data prepare --input FILES --output {path}"


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
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise DataError(f"{self.path} has no split {split!r}; available: {', '.join(sorted(splits)) or 'none'}")
        self.info = splits[split]
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["tokenizer"]["vocab_size"])
        self.eos_id = int(self.meta["tokenizer"]["eos_id"])
        self.num_tokens = int(self.info["tokens"])
        self.num_documents = int(self.info["documents"])
        self.bin_path = self.path / self.info["file"]
        if not self.bin_path.is_file():
            raise DataError(f"{self.bin_path}: token file of split {split!r} is missing")
        expected, actual = self.num_tokens * self.dtype.itemsize, os.path.getsize(self.bin_path)
        if actual != expected:
            raise DataError(
                f"{self.bin_path}: wrong size, expected {expected} bytes ({self.num_tokens} {self.dtype.name} "
                f"tokens), found {actual} bytes ({'truncated' if actual < expected else 'too long'})"
            )
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        """The split's token stream, 1-D [num_tokens], read-only."""

    @cached_property
    def doc_offsets(self) -> np.ndarray:
        """int64 [num_documents + 1]: document d is tokens[offsets[d] : offsets[d+1]] (its EOS included)."""
        path = self.path / self.info.get("docs_file", f"{self.split}.docs.npy")
        if not path.is_file():
            raise DataError(f"{path}: document offsets of split {self.split!r} are missing")
        offsets = np.load(path, mmap_mode="r")
        if offsets.shape != (self.num_documents + 1,) or (len(offsets) and offsets[-1] != self.num_tokens):
            counts = f"{self.num_documents} documents, {self.num_tokens} tokens"
            raise DataError(f"{path}: does not match meta.json ({counts})")
        return offsets

    def verify(self) -> None:
        """Recompute the sha256 of the token file; raise DataError if it differs from meta.json."""
        actual = file_sha256(self.bin_path)
        if actual != self.info["sha256"]:
            expected = self.info["sha256"]
            raise DataError(f"{self.bin_path}: checksum mismatch, meta.json says {expected}, the file is {actual}")

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
