"""Ranks that disagree get one named error on every rank, within seconds, never a result or a hang.

Every case runs on all ranks of a DistPool; one rank (or every rank, for lengths) changes one argument,
and every rank must raise `RanksDisagree` naming the argument and each rank's value. The group must
work normally afterwards.
"""

import time

import pytest
import torch
import torch.distributed as dist

from lasp import (
    lasp1_linear_attn,
    lasp2_linear_attn,
    lasp2h_softmax_attn,
    ring_softmax_attn,
    ulysses_linear_attn,
    ulysses_softmax_attn,
)
from lasp.distributed.agree import Fingerprint, RanksDisagree, _check, _encode

LINEAR = {"lasp2": lasp2_linear_attn, "lasp1": lasp1_linear_attn, "ulysses_linear": ulysses_linear_attn}
SOFTMAX = {"lasp2h": lasp2h_softmax_attn, "ring": ring_softmax_attn, "ulysses": ulysses_softmax_attn}
BASE = dict(
    T=8,
    B=2,
    H=12,
    Hkv=6,
    K=8,
    V=4,
    dtype=torch.float32,
    layout="contiguous",
    causal=True,
    decay=None,
    scale=None,
    beta=False,
)


def _disagreements(W: int) -> dict[str, tuple[dict, str]]:
    """name -> (the arguments of rank W-1 (or a function of the rank), the expected message)."""

    def each(base, changed) -> str:
        return ", ".join(f"rank {r}: {changed if r == W - 1 else base}" for r in range(W))

    by_rank = ", ".join(f"rank {r}: {8 * (r + 1)}" for r in range(W))
    return {
        "length": (lambda r: dict(T=8 * (r + 1)), f"ranks disagree on local length: {by_rank}"),
        "heads": (dict(H=6), f"ranks disagree on query heads: {each('12', '6')}"),
        "kv_heads": (dict(Hkv=3), f"ranks disagree on key/value heads: {each('6', '3')}"),
        "head_dim": (dict(K=4), f"ranks disagree on key head dim: {each('8', '4')}"),
        "value_dim": (dict(V=6), f"ranks disagree on value head dim: {each('4', '6')}"),
        "batch": (dict(B=1), f"ranks disagree on batch size: {each('2', '1')}"),
        "dtype_size": (dict(dtype=torch.float64), f"ranks disagree on dtype: {each('float32', 'float64')}"),
        "dtype_bits": (dict(dtype=torch.bfloat16), f"ranks disagree on dtype: {each('float32', 'bfloat16')}"),
        "layout": (dict(layout="zigzag"), f"ranks disagree on layout: {each('contiguous', 'zigzag')}"),
        "causal": (dict(causal=False), f"ranks disagree on causal: {each('True', 'False')}"),
        "scale": (dict(scale=0.5), f"ranks disagree on scale: {each(repr(8**-0.5), '0.5')}"),
        "decay_one_rank": (dict(decay="on"), f"ranks disagree on decay: {each('none', '')}"),
        "decay_values": (dict(decay="other"), "ranks disagree on decay: rank 0: -"),
        "delta_one_rank": (dict(beta=True), f"ranks disagree on delta rule: {each('False', 'True')}"),
    }


def _inputs(a: dict, linear: bool):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(a["B"], a["T"], a["H"], a["K"], generator=gen).to(a["dtype"])
    k = torch.randn(a["B"], a["T"], a["Hkv"], a["K"], generator=gen).to(a["dtype"])
    v = torch.randn(a["B"], a["T"], a["Hkv"], a["V"], generator=gen).to(a["dtype"])
    kw = dict(layout=a["layout"], causal=a["causal"], scale=a["scale"])
    if linear:
        decay = {None: None, "on": -torch.linspace(0.1, 0.9, a["H"]), "other": -torch.linspace(0.2, 0.8, a["H"])}
        kw["log_decay"] = decay[a["decay"]]
        if a["beta"]:  # the delta rule on this rank
            kw["beta"] = torch.rand(a["B"], a["T"], a["H"], generator=gen).add(0.1).to(a["dtype"])
    return q, k, v, kw


def case_disagreements(algo: str, names: list[str]) -> dict:
    rank, W = dist.get_rank(), dist.get_world_size()
    linear = algo in LINEAR
    fn = {**LINEAR, **SOFTMAX}[algo]
    out = {}
    for name in names:
        change, _ = _disagreements(W)[name]
        if name == "delta_one_rank" and not linear:
            continue
        if name in ("decay_one_rank", "decay_values"):
            if not linear:
                continue
            base = {**BASE, "decay": "on"} if name == "decay_values" else BASE
        else:
            base = BASE
        mine = change(rank) if callable(change) else (change if rank == W - 1 else {})
        q, k, v, kw = _inputs({**base, **mine}, linear)
        start = time.monotonic()
        try:
            o = fn(q.requires_grad_(), k, v, **kw)
            o.sum().backward()
            out[name] = ("no error", None, time.monotonic() - start)
        except RanksDisagree as e:
            out[name] = ("RanksDisagree", str(e), time.monotonic() - start)
        # the group still works, and a later call of a new size announces it again
        q, k, v, kw = _inputs(BASE, linear)
        ok = fn(q, k, v, **kw)
        assert ok.shape[1] == BASE["T"]
    return out


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("algo", list(LINEAR) + list(SOFTMAX))
def test_every_rank_names_the_disagreement(dist_pool, algo, W):
    names = list(_disagreements(W))
    results = dist_pool(W).run("tests.test_rank_agreement:case_disagreements", algo=algo, names=names)
    for name in names:
        if algo not in LINEAR and name.startswith(("decay", "delta")):
            continue
        want = _disagreements(W)[name][1]
        for rank, r in enumerate(results):
            kind, msg, seconds = r[name]
            assert kind == "RanksDisagree", (name, rank, r[name])
            assert want in msg, (name, rank, msg)
            assert seconds < 10, (name, rank, seconds)


def case_one_rank_refuses(algo: str) -> list:
    """The last rank's local length does not split under zigzag: it raises its own error, the others
    raise because it refused."""
    rank, W = dist.get_rank(), dist.get_world_size()
    linear = algo in LINEAR
    q, k, v, kw = _inputs({**BASE, "layout": "zigzag", "T": 7 if rank == W - 1 else 8}, linear)
    try:
        {**LINEAR, **SOFTMAX}[algo](q, k, v, **kw)
    except ValueError as e:
        return [type(e).__name__, str(e)]
    return ["no error", ""]


@pytest.mark.parametrize("algo", list(LINEAR) + list(SOFTMAX))
def test_a_rank_with_bad_arguments_stops_the_others(dist_pool, algo):
    results = dist_pool(3).run("tests.test_rank_agreement:case_one_rank_refuses", algo=algo)
    assert results[2][0] == "ValueError" and "local length 7" in results[2][1], results[2]
    for kind, msg in results[:2]:
        assert kind == "RanksDisagree" and "rank(s) [2] refused their arguments" in msg, msg


def case_skipped_backward() -> str:
    """Rank 0's loss ignores the second LASP-2 call: its backward gathers the first call's state gradients
    while rank 1 gathers the second's. Without the header they would be summed into wrong gradients."""
    q, k, v, kw = _inputs({**BASE, "decay": "on"}, linear=True)
    a = lasp2_linear_attn(q.clone().requires_grad_(), k, v, **kw)
    b = lasp2_linear_attn(q.clone().requires_grad_(), k, v, **kw)
    loss = a.sum() if dist.get_rank() == 0 else (a + b).sum()
    try:
        loss.backward()
    except RanksDisagree as e:
        return str(e)
    return "no error"


def test_a_skipped_backward_is_named_not_summed(dist_pool):
    for msg in dist_pool(2).run("tests.test_rank_agreement:case_skipped_backward"):
        assert "lasp2.bwd: ranks disagree on the call number" in msg, msg
        assert "does every rank's loss depend on every layer's output?" in msg


def test_headers_compare_every_field_at_once():
    fp = Fingerprint("op", (("length", 4), ("dtype", "float32"), ("scale", 0.5), ("causal", True), ("d", None)))
    other = Fingerprint(
        "op",
        (
            ("length", 5),
            ("dtype", "float16"),
            ("scale", 0.5),
            ("causal", True),
            ("d", torch.tensor(-1.5, dtype=torch.float64)),
        ),
    )
    heads = [_encode(f, 1, 600, 3, torch.device("cpu")).tolist() for f in (fp, other)]
    with pytest.raises(RanksDisagree) as e:
        _check(heads, fp)
    lines = str(e.value).splitlines()
    assert lines == [
        "op: ranks disagree on length: rank 0: 4, rank 1: 5",
        "ranks disagree on dtype: rank 0: float32, rank 1: float16",
        "ranks disagree on d: rank 0: none, rank 1: -1.5",
    ]
    _check([heads[0], heads[0]], fp)  # agreement: no error


@pytest.mark.slow
def test_the_rank_checks_benchmark_writes_its_rows(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "rc"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lasp.bench.rank_checks",
            "--world-size",
            "2",
            "--local-len",
            "64",
            "--reps",
            "2",
            "--isolated-reps",
            "5",
            "--ops",
            "lasp2",
            "lasp1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["op"] for r in rows] == ["lasp2", "lasp1", "lasp2"] and rows[-1]["isolated"]
    assert all(r["seconds_checked"] > 0 and r["seconds_unchecked"] > 0 for r in rows[:2])
    assert rows[-1]["checked_seconds"] > 0 and rows[-1]["local_len"] == 64 and "git" in json.dumps(rows[0])
    assert "x2 (forward, backward)" in run.stdout
