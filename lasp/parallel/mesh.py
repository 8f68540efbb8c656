"""Which rank holds what: the TP x SP x PP x DP mesh as a picture.

    python -m lasp.parallel.mesh --tp 2 --sp 2 --pp 2 --dp 1 [--ep 2] [--seq-len 96 --layers 4 --heads 4 --batch 2]

Rank order is megatron-core's default (tp-cp-ep-dp-pp, fastest first): consecutive ranks share
everything but their TP shard, then their SP shard, then their DP replica; the pipeline stage changes
slowest.
"""

import argparse
from dataclasses import dataclass

from lasp.cli import at_least, usage_error
from lasp.model.config import ModelConfig
from lasp.parallel.config import ParallelConfig
from lasp.sp.layout import LAYOUTS, SeqLayout


@dataclass(frozen=True)
class Coord:
    tp: int
    sp: int
    dp: int
    pp: int


def coords(cfg: ParallelConfig) -> list[Coord]:
    """Mesh coordinates of every global rank, in rank order."""
    out = []
    for rank in range(cfg.world_size):
        r, tp = divmod(rank, cfg.tp)
        r, sp = divmod(r, cfg.sp)
        pp, dp = divmod(r, cfg.dp)
        out.append(Coord(tp, sp, dp, pp))
    return out


def describe(cfg: ParallelConfig, seq_len: int, layers: int, heads: int, batch: int) -> str:
    """One line per rank: its coordinates, layers, heads, batch rows and token chunks."""
    lay = SeqLayout(cfg.sp_layout, cfg.sp)
    chunk = seq_len // lay.num_chunks
    lines = [f"tp={cfg.tp} sp={cfg.sp} ({cfg.sp_layout}) pp={cfg.pp} dp={cfg.dp}: {cfg.world_size} ranks"]
    if cfg.sp > 1:
        m = cfg.sp_method
        link = "" if "auto" not in (m.linear, m.softmax) else f"; auto prices on {cfg.sp_link}"
        lines.append(f"sp methods: linear layers {m.linear}, softmax layers {m.softmax}{link}")
    lines.append("rank | tp sp dp pp | layers  | heads   | batch rows | tokens")
    for rank, c in enumerate(coords(cfg)):
        per_l, per_h, per_b = layers // cfg.pp, heads // cfg.tp, batch // cfg.dp
        toks = " + ".join(f"[{i * chunk}, {(i + 1) * chunk})" for i in lay.chunks_of(c.sp))
        lines.append(
            f"{rank:4d} | {c.tp:2d} {c.sp:2d} {c.dp:2d} {c.pp:2d} | {c.pp * per_l}-{(c.pp + 1) * per_l - 1:<5d} | "
            f"{c.tp * per_h}-{(c.tp + 1) * per_h - 1:<5d} | {c.dp * per_b}-{(c.dp + 1) * per_b - 1:<8d} | {toks}"
        )
    if cfg.ep > 1:
        lines += [
            "expert parallelism: ep=" + f"{cfg.ep} (etp={cfg.etp}); each group holds every expert once, "
            "tokens reach them by all-to-all",
            "EP groups: " + " ".join(str(g) for g in ep_groups(cfg)),
        ]
    return "\n".join(lines)


def ep_groups(cfg: ParallelConfig) -> list[list[int]]:
    """The EP groups' ranks: for each stage and TP rank, ep consecutive ranks of its DP x SP ranks (SP
    fastest), as lasp.parallel.groups builds them."""
    rank_of = {c: r for r, c in enumerate(coords(cfg))}
    out = []
    for pp in range(cfg.pp):
        for tp in range(cfg.tp):
            line = [rank_of[Coord(tp, sp, dp, pp)] for dp in range(cfg.dp) for sp in range(cfg.sp)]
            out += [line[i : i + cfg.ep] for i in range(0, len(line), cfg.ep)]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lasp.parallel.mesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name in ("tp", "sp", "pp", "dp", "ep"):
        p.add_argument(f"--{name}", type=int, default=1)
    p.add_argument("--sp-layout", choices=LAYOUTS, default="zigzag")
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args(argv)
    sizes = {
        f"--{name.replace('_', '-')}": getattr(a, name)
        for name in ("tp", "sp", "pp", "dp", "ep", "seq_len", "layers", "heads", "batch")
    }
    usage_error(p, [q for option, value in sizes.items() for q in at_least(option, value)])
    cfg = ParallelConfig(tp=a.tp, sp=a.sp, pp=a.pp, dp=a.dp, ep=a.ep, sp_layout=a.sp_layout)
    # the widths no option sets are multiples of tp: only what was asked for can be wrong
    model = ModelConfig(
        num_layers=a.layers,
        num_heads=a.heads,
        num_kv_heads=a.heads,
        hidden_size=16 * a.heads,
        vocab_size=256 * a.tp,
        ffn_hidden_size=176 * a.tp,
        moe=dict(num_experts=8 * a.ep) if a.ep > 1 else None,
    )
    usage_error(p, cfg.problems(model, cfg.world_size, a.seq_len, a.batch))
    print(describe(cfg, a.seq_len, a.layers, a.heads, a.batch))


if __name__ == "__main__":
    main()
