"""Tokenizers: raw UTF-8 bytes (the default, nothing to download) or a local Hugging Face `tokenizer.json`.

Both give the same small interface: `name`, `vocab_size`, `eos_id`, `encode`, `decode`, `describe`. Every
document gets an EOS token after it, so a tokenizer without one of its own gets a new id past its vocabulary.
"""

import hashlib
from pathlib import Path

import numpy as np

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class DataError(ValueError):
    """A mistake in the data layer's inputs (files, tokenizer, prepared directory); the message says what."""


def file_sha256(path: str | Path, block: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in `block`-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(block):
            h.update(piece)
    return h.hexdigest()


class ByteTokenizer:
    """UTF-8 bytes 0..255 are the tokens; EOS = 256 (vocabulary 257)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        """text -> token ids [len(text.encode())], no EOS."""
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once -> one int64 array of ids per text (the fast path `prepare` uses)."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids) -> str:
        """ids -> text; EOS and out-of-range ids are dropped, a broken UTF-8 sequence becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a local tokenizer.json (never the network)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if self.path.is_dir() and (self.path / "tokenizer.json").is_file():  # a model directory (Hugging Face's)
            self.path = self.path / "tokenizer.json"
        if not self.path.is_file():
            what = "is a directory without a tokenizer.json" if self.path.is_dir() else "does not exist"
            raise DataError(f"tokenizer file {str(self.path)!r} {what} (expected `byte` or a tokenizer.json)")
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise DataError(f"tokenizer file {str(self.path)!r} could not be read as a tokenizer.json: {e}") from e
        self.sha256 = file_sha256(self.path)
        self.name = self.path.name
        base = self._tok.get_vocab_size(with_added_tokens=True)
        found = [(t, self._tok.token_to_id(t)) for t in EOS_CANDIDATES if self._tok.token_to_id(t) is not None]
        if found:
            self.eos_token, self.eos_id = found[0]
            self.eos_added = False
            # an added special token can sit past the base vocabulary; the embedding must cover it
            self.vocab_size = max(base, self.eos_id + 1)
        else:
            # no EOS of its own: a new id right after the vocabulary, known only to this project
            self.eos_token, self.eos_id, self.eos_added = None, base, True
            self.vocab_size = base + 1

    def encode(self, text: str) -> list[int]:
        """text -> token ids, without the tokenizer's own special tokens (EOS is added by the caller)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once (batched, using the tokenizer's threads) -> one int64 array of ids per text."""
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """ids -> text; an appended EOS id (unknown to the tokenizer itself) is dropped."""
        ids = [int(i) for i in ids if not (self.eos_added and int(i) == self.eos_id)]
        return self._tok.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
            "eos_added": self.eos_added,
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
        }


def load_tokenizer(spec: str = "byte") -> ByteTokenizer | HFTokenizer:
    """`byte` -> ByteTokenizer; anything else is the path of a local Hugging Face tokenizer.json, or of a
    model directory holding one (what `lasp.model.from_hf` and `train.init_from` read)."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def directory_tokenizer(path: str | Path) -> dict | None:
    """The description of the tokenizer.json a model directory holds (a Hugging Face one's own tokenizer),
    or None when it holds none."""
    return HFTokenizer(path).describe() if (Path(path) / "tokenizer.json").is_file() else None


def _text(desc: dict) -> str:
    sha = f", sha256 {desc['sha256'][:12]}..." if desc.get("sha256") else ""
    return f"{desc.get('name')!r} (vocab {desc.get('vocab_size', '?')}, EOS {desc.get('eos_id', '?')}{sha})"


def tokenizer_problems(expected: dict | None, found: dict | None, expected_from: str, found_from: str) -> list[str]:
    """How two tokenizer descriptions (`describe()` dicts, as prepare, checkpoints and exports record them)
    disagree: one line naming both sides and what differs, or [] when everything both record agrees. Files
    are compared by sha256 when both sides have one, else by name; then vocab_size and eos_id. A side that
    records nothing (None) cannot be compared: [] (the caller says so)."""
    if not expected or not found:
        return []
    keys = (
        ("sha256", "vocab_size", "eos_id")
        if expected.get("sha256") and found.get("sha256")
        else ("name", "vocab_size", "eos_id")
    )
    differ = [
        f"{k} {found[k]!r} vs {expected[k]!r}" for k in keys if k in expected and k in found and expected[k] != found[k]
    ]
    if not differ:
        return []
    return [
        f"{found_from} was trained with tokenizer {_text(found)}, but {expected_from} has {_text(expected)}: "
        f"the same ids would mean other text ({', '.join(differ)})"
    ]
