"""The data layer: tokenizers, `prepare` (text -> packed token files), memory-mapped tokens, and the loader
(a pure function of (seed, step) that reads only this rank's rows and sequence chunks).

Imports nothing of lasp but `lasp.sp.layout` (docs/design.md, "Layers of the code")."""

from lasp.data.dataset import TokenData
from lasp.data.loader import epoch_of, global_sample_ids, local_microbatches
from lasp.data.prepare import prepare
from lasp.data.tokenizer import ByteTokenizer, DataError, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "TokenData",
    "epoch_of",
    "global_sample_ids",
    "load_tokenizer",
    "local_microbatches",
    "prepare",
]
