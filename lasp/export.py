"""python -m lasp.export --checkpoint DIR --out DIR [--dtype float32|bfloat16]

Consolidates a sharded trainer checkpoint, whatever the layout that saved it (tp, sp, pp, dp), into one
`model.safetensors` plus `config.json` (and the tokenizer), which `lasp.model.from_pretrained(DIR)` loads
on one device and `python -m lasp.generate` samples from. LoRA adapters are merged into their weights
(lasp.model.lora.merge_lora). `lasp_export.json` records the checkpoint, the files written and the data's
tokenizer. --force replaces only an export (nothing else in it), never a checkpoint or the directory of one.
Runs as one process, without a process group.
"""

import argparse
import os
import shutil
import sys
import tempfile

import torch

from lasp.train.artifacts import checkpoint_model


def _tokenizer_file(checkpoint: str) -> list[str]:
    """The tokenizer.json the export copies, when the checkpoint's data had one: an input too."""
    from lasp.train import ckpt_store

    try:
        path = (ckpt_store.read_state(checkpoint).get("tokenizer") or {}).get("path")
    except (OSError, ValueError, AttributeError):  # consolidate's verify names the damage, with the rest
        return []
    return [path] if path else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lasp.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (.../checkpoints/step-N)")
    p.add_argument("--out", required=True, help="output directory (model.safetensors, config.json)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the weights")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out when it is an export (once the new export is complete); anything else is refused",
    )
    p.add_argument(
        "--hf",
        action="store_true",
        help="when every layer is softmax, write a transformers "
        "directory (LlamaForCausalLM, or Qwen2 / Qwen3 for their features); else the LASP layout",
    )
    args = p.parse_args(argv)

    from lasp.cli import install_directory, new_directory, usage_error
    from lasp.model.pretrained import OWN, PretrainedError, export_files, save_pretrained, write_export_record
    from lasp.train import ckpt_store
    from lasp.train.ckpt_store import CheckpointError

    problems = []
    what = ckpt_store.describe(args.checkpoint)
    inputs = [args.checkpoint]
    if what is not None:
        problems.append(f"--checkpoint {args.checkpoint} {what}")
    else:
        inputs += _tokenizer_file(args.checkpoint)
    out = os.path.abspath(args.out)
    if ckpt_store.classify(out)[0] in ("step", "unfinished", "run", "root"):  # not even with --force
        problems.append(f"--out {out} holds trainer checkpoints; an export goes to a directory of its own")
    else:
        problems += new_directory("--out", out, args.force, export_files, OWN, inputs)
    usage_error(p, problems)
    try:
        model, tokenizer = checkpoint_model(args.checkpoint, dtype=getattr(torch, args.dtype))
        if model.cfg.lora_rank:
            from lasp.model.lora import merge_lora

            rank, model = model.cfg.lora_rank, merge_lora(model)
            print(f"merged the LoRA adapters (rank {rank}) into their weights")
        # built beside --out and renamed into place: a failed export leaves --out as it was
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
        try:
            hf = args.hf and all(model.cfg.mixer(i) == "S" for i in range(model.cfg.num_layers))
            if args.hf and not hf:
                print(
                    f"--hf: model.layer_pattern {model.cfg.layer_pattern!r} has linear layers, which transformers "
                    "does not have: writing the LASP layout (load it with lasp.model.from_pretrained)"
                )
            if hf:
                from lasp.model.hf import to_hf

                to_hf(model, tmp, tokenizer)
            else:
                save_pretrained(model, tmp, tokenizer=tokenizer)
            write_export_record(tmp, args.checkpoint, "hf" if hf else "lasp", tokenizer)
            removed = install_directory(tmp, out)
            if removed:
                print(removed, file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (CheckpointError, PretrainedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in model.state_dict().values())
    print(
        f"exported {args.checkpoint} -> {os.path.join(args.out, 'model.safetensors')} ({n:,} parameters, {args.dtype})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
