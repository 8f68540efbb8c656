"""What a path holds, and its model and tokenizer: the one place that tells a trainer checkpoint from a LASP
export from a Hugging Face directory, for train.init_from, lasp.eval (and its lm-eval model), lasp.generate
and lasp.export.

    kind(path)                 "checkpoint" | "export" | "hf" | None
    load(path)                 (LinearLlama on one device, its tokenizer)
    tokenizer_of(path)         the tokenizer it records, without reading a weight
    recorded(path)             (that tokenizer's description or None, the model's vocabulary size)
    consolidate(checkpoint)    a trainer checkpoint as (ModelConfig, single-device state dict, tokenizer)

A Hugging Face directory may be one `lasp.export --hf` wrote (its tokenizer recorded in config.json) or
any transformers model (its tokenizer.json beside it). train.init_from takes either kind of directory, not
a checkpoint (`init_from_problems`); its weights go through lasp.model.hf.initial_state.
"""

import os
from pathlib import Path
from typing import Literal

import torch

from lasp.data.tokenizer import ByteTokenizer, DataError, directory_tokenizer, load_tokenizer
from lasp.model import from_hf, from_pretrained
from lasp.model.hf import is_hf_directory, source_config
from lasp.model.pretrained import CONFIG, TOKENIZER, WEIGHTS, model_from_state_dict, read_config, recorded_tokenizer
from lasp.train import ckpt_store
from lasp.train.ckpt_store import CheckpointError, last_line

Kind = Literal["checkpoint", "export", "hf"]


class UsageError(ValueError):
    """A path that is neither an export directory, a Hugging Face directory nor a readable trainer checkpoint."""


def kind(path: str | Path) -> Kind | None:
    """What `path` holds, from its files alone (nothing is verified or loaded): a Hugging Face directory (its
    config.json a transformers model's), a LASP export, a committed trainer checkpoint, or None (anything
    else: lasp.train.ckpt_store.describe says what)."""
    if is_hf_directory(str(path)):
        return "hf"
    return {"step": "checkpoint", "export": "export"}.get(ckpt_store.classify(str(path))[0])


def read_tensors(checkpoint_dir: str, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a verified DCP checkpoint whose key starts with `prefix`, whole (its shards joined),
    keyed without the prefix. Reads only those tensors, in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = dcp.FileSystemReader(checkpoint_dir)
    keys = {k for k in reader.read_metadata().state_dict_metadata if k.startswith(prefix)}
    if not keys:
        raise CheckpointError(f"checkpoint {checkpoint_dir} holds no tensors under {prefix!r}")
    sd: dict = {}
    # what dcp's own _load_state_dict_from_keys does, without its collective when a process group exists
    try:
        _load_state_dict(sd, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's own is a BaseException
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} could not be read ({last_line(e)}): a damaged file? (a "
            "checkpoint saved before the sha256 manifests is checked by sizes only)"
        ) from None
    return {k[len(prefix) :]: v for k, v in sd.items()}


def consolidate(checkpoint_dir: str):
    """(ModelConfig, the single-device state dict of LinearLlama, the data's tokenizer description) of a
    trainer checkpoint, verified first. ZeRO checkpoints are consolidated with DeepSpeed's zero_to_fp32
    (tp = 1 only)."""
    from lasp.model import ModelConfig

    ckpt_store.verify(checkpoint_dir)
    info = ckpt_store.read_state(checkpoint_dir)
    cfg = ModelConfig(**info["model"])
    if info["layout"].get("zero_stage"):
        if info["layout"]["tp"] != 1:
            raise CheckpointError(
                f"{checkpoint_dir}: exporting a ZeRO checkpoint saved with tp = "
                f"{info['layout']['tp']} is not supported (only tp = 1)"
            )
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag="zero"))
    else:
        sd = read_tensors(checkpoint_dir, "model/")
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    return cfg, sd, info.get("tokenizer") or {}


def checkpoint_model(checkpoint_dir: str, *, dtype: torch.dtype | None = None, device="cpu"):
    """A trainer checkpoint as (LinearLlama on one device, its tokenizer description)."""
    cfg, sd, tokenizer = consolidate(checkpoint_dir)
    return model_from_state_dict(cfg, sd, checkpoint_dir, device=device, dtype=dtype), tokenizer


def tokenizer_from_description(desc: dict | None, local_file: Path | None = None, source: str = "checkpoint"):
    """The tokenizer a model was trained with, from its `describe()` dict: "byte" -> ByteTokenizer;
    otherwise `local_file` (a copied tokenizer.json) when it exists, else the recorded path. A recorded
    sha256 must match the file found."""
    if not desc:
        raise DataError(f"{source} records no tokenizer: cannot turn text into ids")
    if desc.get("name") == "byte":
        return ByteTokenizer()
    path = local_file if local_file is not None and local_file.is_file() else desc.get("path")
    if not path:
        raise DataError(f"{source}: tokenizer {desc.get('name')!r} has no tokenizer.json beside it and no path")
    tok = load_tokenizer(str(path))
    if desc.get("sha256") and tok.sha256 != desc["sha256"]:
        raise DataError(
            f"{source}: tokenizer file {str(path)!r} is not the one the model was trained with "
            f"(sha256 {tok.sha256[:12]}..., recorded {desc['sha256'][:12]}...)"
        )
    return tok


def load_tokenizer_for(directory: str | Path):
    """The tokenizer recorded in an export directory's config.json (its tokenizer.json copy if any)."""
    directory = Path(directory)
    return tokenizer_from_description(
        read_config(directory)["tokenizer"], directory / TOKENIZER, str(directory / CONFIG)
    )


def tokenizer_of(path: str):
    """The tokenizer a model directory or checkpoint records, without reading its weights (DataError if
    it has none)."""
    if is_hf_directory(path):  # lasp.export --hf records the tokenizer beside transformers' files
        desc = recorded_tokenizer(path)
        return load_tokenizer(path) if desc is None else tokenizer_from_description(desc, Path(path) / TOKENIZER, path)
    if os.path.isfile(os.path.join(path, CONFIG)):
        return load_tokenizer_for(path)
    return tokenizer_from_description(ckpt_store.read_state(path).get("tokenizer"), None, path)


def recorded(path: str) -> tuple[dict | None, int]:
    """(the description of the tokenizer a trainer checkpoint, LASP export or Hugging Face directory records,
    None when it records none; the model's vocabulary size), without reading any weight."""
    if os.path.isfile(os.path.join(path, CONFIG)):
        desc = recorded_tokenizer(path)
        if desc is None and is_hf_directory(path):
            desc = directory_tokenizer(path)
        return desc, source_config(path).vocab_size
    state = ckpt_store.read_state(path)
    return state.get("tokenizer") or None, int(state["model"]["vocab_size"])


def init_from_problems(path: str, model, data_path: str | None) -> list[str]:
    """train.init_from: `path` is a Hugging Face directory or a LASP export (not a trainer checkpoint) whose
    weights have `model`'s shape (a ModelConfig), with token ids that mean what the data's at `data_path`
    do (None: not compared)."""
    from lasp.data.dataset import tokenizer_against
    from lasp.model.hf import HFImportError, mismatches

    if kind(path) == "checkpoint":
        return [
            f"train.init_from: {path} is a trainer checkpoint; train.init_from takes a Hugging Face directory or "
            "a LASP export: continue from the checkpoint with train.resume, or export it with python -m "
            "lasp.export first"
        ]
    try:
        p = [f"train.init_from: {q}" for q in mismatches(model, source_config(path))]
        if data_path is not None:
            p += tokenizer_against(data_path, path, recorded_tokenizer(path))
        return p
    except (HFImportError, ValueError, OSError, KeyError) as e:
        return [f"train.init_from: {e}".replace("\n", "\n  ")]


def load(path: str | Path, *, dtype: torch.dtype | None = torch.float32, device="cpu"):
    """(model, tokenizer) from a Hugging Face directory, an export directory or a trainer checkpoint
    directory; UsageError when it is none of them. `dtype` None: as stored."""
    d = Path(path)
    if not d.is_dir():
        raise UsageError(f"--checkpoint {str(d)!r} is not a directory")
    what = kind(d)
    if what == "hf":
        return from_hf(str(d), dtype=dtype, device=device), tokenizer_of(str(d))
    if what == "export":
        return from_pretrained(d, dtype=dtype, device=device), load_tokenizer_for(d)
    try:
        model, tok_desc = checkpoint_model(str(d), dtype=dtype, device=device)
    except CheckpointError as e:
        raise UsageError(
            f"{d} is neither an export directory (no {WEIGHTS}) nor a usable trainer checkpoint: {e}"
        ) from e
    return model, tokenizer_from_description(tok_desc, None, str(d))
