"""One hybrid step on one zigzag split: a linear-attention layer (LASP-2) then a softmax layer (LASP-2H).

    .venv/bin/torchrun --nproc-per-node 2 examples/hybrid_step.py

Every rank builds the same full tensors, keeps its zigzag shard, runs both layers sequence-parallel and
compares its shard of the output and of the input gradient with the same two layers on one process.
"""

import torch
import torch.distributed as dist

import lasp

dist.init_process_group("gloo")
rank, W = dist.get_rank(), dist.get_world_size()
B, N, H, Hkv, D = 1, 1024, 4, 2, 32
torch.manual_seed(0)
x = torch.randn(B, N, H * D)
w_lin, w_soft = torch.randn(H * D, 3 * H * D) / (H * D) ** 0.5, torch.randn(H * D, (H + 2 * Hkv) * D) / (H * D) ** 0.5
log_decay = -torch.linspace(0.01, 0.5, H)


def layers(x, linear_op, softmax_op):
    q, k, v = (x @ w_lin).view(*x.shape[:2], 3, H, D).unbind(2)
    y = x + linear_op(q, k, v, log_decay=log_decay).flatten(2)
    q, k, v = (y @ w_soft).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.unflatten(-1, (H, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D))
    return y + softmax_op(q, k, v).flatten(2)


shard = lambda t: lasp.shard_sequence(t, rank=rank, world_size=W, layout="zigzag")  # noqa: E731
x_local = shard(x).requires_grad_()
out_local = layers(
    x_local,
    lambda q, k, v, **kw: lasp.lasp2_linear_attn(q, k, v, layout="zigzag", **kw),
    lambda q, k, v: lasp.lasp2h_softmax_attn(q, k, v, layout="zigzag"),
)
out_local.square().mean().backward()  # each rank's share of the loss; gradients flow across ranks

x_full = x.clone().requires_grad_()
out_full = layers(x_full, lasp.linear_attn, lasp.softmax_attn)
(out_full.square().sum() / (out_local.numel())).backward()  # the same loss terms, summed over ranks

rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
print(
    f"rank {rank}: relative difference from one process: output {rel(out_local, shard(out_full)):.1e}, "
    f"input gradient {rel(x_local.grad, shard(x_full.grad)):.1e}"
)
dist.destroy_process_group()
