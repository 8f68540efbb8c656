"""Saving and loading a trained LinearLlama for one device: `model.safetensors` + `config.json`.

    dir/model.safetensors   the single-device state dict (tied embeddings stored once, as embed.weight)
    dir/config.json         {"format": "lasp-linear-llama", "version": 1, "model": ModelConfig fields,
                             "tokenizer": the tokenizer's description or null}
    dir/tokenizer.json      a copy of the Hugging Face tokenizer file, when the description has a "path"
    dir/lasp_export.json    written by `python -m lasp.export` (either layout, transformers' too): the
                            checkpoint, the layout, the files it wrote and the data's tokenizer

Loading is strict: a missing file, a config that does not build, a missing, unexpected or mis-shaped
tensor are errors naming the file and every problem found.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lasp.model.config import ModelConfig
from lasp.model.llama import LinearAttention, LinearLlama

FORMAT, VERSION = "lasp-linear-llama", 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
RECORD, RECORD_FORMAT = "lasp_export.json", "lasp-export"
OWN = "an export made by lasp.export"


class PretrainedError(ValueError):
    """A saved model that cannot be loaded (or saved); the message names the file and what is wrong."""


def _tied_alias(cfg: ModelConfig) -> set[str]:
    """State-dict keys that are the same tensor as another key and are not stored."""
    return {"lm_head.weight"} if cfg.tie_embeddings else set()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_pretrained(model: LinearLlama, directory: str | Path, tokenizer: dict | None = None) -> Path:
    """Write `model` (any device or dtype, as stored) and its tokenizer description to `directory`."""
    out = Path(directory)
    cfg = model.cfg
    tok_file = None
    if tokenizer is not None:
        if tokenizer.get("vocab_size", 0) > cfg.vocab_size:
            raise PretrainedError(
                f"tokenizer vocab_size {tokenizer['vocab_size']} exceeds the model's vocab_size {cfg.vocab_size}"
            )
        if tokenizer.get("path"):
            tok_file = Path(tokenizer["path"])
            if not tok_file.is_file():
                raise PretrainedError(f"tokenizer file {str(tok_file)!r} named by the tokenizer description is missing")
    out.mkdir(parents=True, exist_ok=True)
    skip = _tied_alias(cfg)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}
    _write_atomic(out / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    if tok_file is not None:
        _write_atomic(out / TOKENIZER, lambda p: shutil.copyfile(tok_file, p))
    config = {"format": FORMAT, "version": VERSION, "model": dataclasses.asdict(cfg), "tokenizer": tokenizer or None}
    _write_atomic(out / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out


def read_config(directory: str | Path) -> dict:
    """The parsed, checked config.json of a saved model (format and version known, "model" present)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise PretrainedError(f"{path}: missing (not a saved LinearLlama directory?)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise PretrainedError(f"{path}: format must be {FORMAT!r}, got {got!r}")
    if config.get("version") != VERSION:
        raise PretrainedError(f"{path}: version {config.get('version')!r} is not supported (this code reads {VERSION})")
    if not isinstance(config.get("model"), dict):
        raise PretrainedError(f'{path}: "model" must be an object of ModelConfig fields')
    return config


def _build_config(fields: dict, source: str) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise PretrainedError(f"{source}: unknown model config field(s) {', '.join(unknown)}")
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise PretrainedError(f"{source}: the model config does not build: {e}") from e


def model_from_state_dict(
    cfg: ModelConfig, state_dict: dict[str, Tensor], source: str, device="cpu", dtype: torch.dtype | None = None
) -> LinearLlama:
    """A LinearLlama of shape `cfg` holding exactly `state_dict` (keys as `LinearLlama.state_dict()`; a tied
    lm_head.weight may be absent or equal to embed.weight). dtype None keeps the stored floating dtype.
    `source` names where the tensors came from in error messages."""
    model = LinearLlama(cfg)
    expected = model.state_dict()
    skip = _tied_alias(cfg)
    given = dict(state_dict)
    for k in skip & set(given):
        alias, emb = given.pop(k), given.get("embed.weight")
        if emb is None or alias.shape != emb.shape or not torch.equal(alias, emb):
            raise PretrainedError(f"{source}: {k} differs from embed.weight but the config ties the embeddings")
    problems = [f"missing tensor {k} {list(v.shape)}" for k, v in expected.items() if k not in given and k not in skip]
    problems += [f"unexpected tensor {k} {list(v.shape)}" for k, v in given.items() if k not in expected]
    problems += [
        f"tensor {k} has shape {list(v.shape)}, the config needs {list(expected[k].shape)}"
        for k, v in given.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems += [f"tensor {k} is {v.dtype}, not floating point" for k, v in given.items() if not v.is_floating_point()]
    if problems:
        raise PretrainedError(f"{source}: does not match the model config:\n  " + "\n  ".join(problems))
    decays = {m: m.log_decay for m in model.modules() if isinstance(m, LinearAttention) and m.log_decay is not None}
    model.to(dtype=given["embed.weight"].dtype if dtype is None else dtype)
    model.load_state_dict(given, strict=False)  # strictness checked above; the tied alias is left out
    if model.embed.weight.dtype in (torch.bfloat16, torch.float16):
        # decays are fixed float32 constants; rounding them to 8 mantissa bits would change the model
        for m, g in decays.items():
            m.log_decay = g
    model.to(device=device)
    return model.eval()


def from_pretrained(directory: str | Path, *, dtype: torch.dtype | None = None, device="cpu") -> LinearLlama:
    """Load a model written by `save_pretrained` onto one device (dtype None: as stored)."""
    directory = Path(directory)
    config = read_config(directory)
    cfg = _build_config(config["model"], str(directory / CONFIG))
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise PretrainedError(f"{weights}: missing (config.json is there, the weights are not)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise PretrainedError(f"{weights}: not a readable safetensors file: {e}") from e
    return model_from_state_dict(cfg, tensors, str(weights), device, dtype)


def write_export_record(directory: str | Path, checkpoint: str, layout: str, tokenizer: dict | None) -> None:
    """Record what `python -m lasp.export` wrote into `directory` (every file there now), from which
    checkpoint, in which layout ("lasp" or "hf"), and the tokenizer of the data it was trained on."""
    out = Path(directory)
    record = {
        "format": RECORD_FORMAT,
        "version": 1,
        "checkpoint": os.path.abspath(checkpoint),
        "layout": layout,
        "files": sorted(p.name for p in out.iterdir()) + [RECORD],
        "tokenizer": tokenizer or None,
    }
    _write_atomic(out / RECORD, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))


def _record(directory: Path) -> dict | None:
    try:
        record = json.loads((directory / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def _lasp_config(directory: Path) -> dict | None:
    try:
        return read_config(directory)
    except (PretrainedError, OSError):
        return None


def export_files(directory: str | Path) -> set[str] | str:
    """The names lasp.export (or `save_pretrained`) wrote into `directory`: the files its record lists, or
    for a directory without one whose config.json is a LASP model's, what `save_pretrained` writes. Else why
    it is not an export, as the rest of a sentence about it (what `--force` may replace: lasp.cli)."""
    directory = Path(directory)
    record = _record(directory)
    if record is not None and isinstance(record.get("files"), list):
        return {str(name) for name in record["files"]}
    if _lasp_config(directory) is not None:
        return {WEIGHTS, CONFIG, TOKENIZER}
    return f"has no {RECORD} and no config.json of a LASP model"


def recorded_tokenizer(directory: str | Path) -> dict | None:
    """The description of the tokenizer a LASP export's model was trained with (its record's, else its
    config.json's); None when it records none, or is no LASP export (a Hugging Face directory)."""
    directory = Path(directory)
    record = _record(directory)
    if record is not None:
        return record.get("tokenizer") or None
    config = _lasp_config(directory)
    return (config.get("tokenizer") or None) if config is not None else None
