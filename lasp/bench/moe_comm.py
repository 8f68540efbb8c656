"""Bytes a MoE model's training step moves, counted by the torch profiler: one rank of a torchrun job.

    torchrun --nproc-per-node 2 -m lasp.bench.moe_comm --config configs/cpu-moe.yaml [--ep 2]

Builds the config's model under its parallel layout (parallel.ep from --ep), runs one training step of
random tokens (after one unprofiled step), and prints on rank 0 one JSON line: the bytes this rank sent
through all-to-all (megatron's token dispatcher: tokens and their router weights, to their experts' rank
and back, forward and backward) per MoE layer, and through all-gather (LASP-2's states, LASP-2H's K/V,
the dispatcher's token counts) per attention layer. Used by `python -m lasp.bench.train --moe`.
"""

import argparse
import json

import torch
import torch.distributed as dist

from lasp.distributed.events import cpu_profile, profiled_ops

_BYTES = {"float": 4, "double": 8, "long int": 8, "int": 4, "c10::BFloat16": 2, "c10::Half": 2, "bool": 1}


def _bytes(op) -> int:
    total = 0
    for shape, dtype in zip(op.input_shapes, op.input_dtypes):
        n = 1
        for s in shape or [0]:
            n *= s
        total += n * _BYTES.get(dtype, 4) if shape else 0
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lasp.bench.moe_comm", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/cpu-moe.yaml")
    p.add_argument("--ep", type=int, default=None, help="parallel.ep (default: the config's)")
    a = p.parse_args(argv)
    from lasp.model import LinearLlama
    from lasp.parallel import init_groups, parallelize, train_step
    from lasp.train.config import load_config

    dist.init_process_group("gloo")
    sets = [f"parallel.ep={a.ep}"] if a.ep else []
    cfg = load_config(a.config, sets, world_size=dist.get_world_size(), check_data=False)
    m, par = cfg.model, cfg.parallel
    groups = init_groups(par)
    torch.manual_seed(0)
    stage = parallelize(LinearLlama(m), par, groups)
    tokens = torch.randint(
        0, m.vocab_size, (cfg.data.global_batch, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(1)
    )
    train_step(stage, tokens, par, groups)
    with cpu_profile(record_shapes=True) as prof:
        train_step(stage, tokens, par, groups)
    ops = profiled_ops(prof, "gloo:")
    moe_layers = sum(m.moe is not None and m.moe.is_moe(i) for i in range(m.num_layers))
    a2a = sum(_bytes(op) for op in ops if "all_to_all" in op.name)
    gather = sum(_bytes(op) for op in ops if "all_gather" in op.name or "allgather" in op.name)
    row = {
        "what": "moe_comm",
        "ep": par.ep,
        "sp": par.sp,
        "tokens_per_rank": cfg.tokens_per_step // par.dp // par.sp,
        "moe_layers": moe_layers,
        "all_to_all_bytes_per_moe_layer": a2a / max(moe_layers, 1),
        "all_gather_bytes_per_layer": gather / m.num_layers,
        "ops": sorted({op.name for op in ops}),
    }
    if dist.get_rank() == 0:
        print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
