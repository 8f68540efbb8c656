"""Loss by position (lasp.eval.positions, `python -m lasp.eval positions`): the buckets equal a direct
per-token computation on one process and under SP = 2 on both layouts; bad input is refused up front."""

import json

import pytest
import torch
import torch.nn.functional as F

from lasp.eval.positions import buckets, position_losses
from lasp.model import LinearLlama, ModelConfig
from tests.refusals import refuse_all

MODEL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
             layer_pattern="LS", linear_variant="simple_gla")
N = 96


def _model() -> LinearLlama:
    torch.manual_seed(0)
    return LinearLlama(ModelConfig(**MODEL)).double().eval()


def _rows(R=3) -> torch.Tensor:
    return torch.randint(0, MODEL["vocab_size"], (R, N + 1), generator=torch.Generator().manual_seed(4))


def _direct(model, rows) -> list[tuple[float, int]]:
    """Per token, by hand: the mean loss of each bucket's positions and their count."""
    with torch.no_grad():
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
    loss = loss.view(len(rows), N)
    return [(loss[:, lo - 1 : hi].mean().item(), loss[:, lo - 1 : hi].numel()) for lo, hi in buckets(N)]


def test_buckets_are_log_spaced_from_64():
    assert buckets(64) == [(1, 64)] and buckets(1) == [(1, 1)]
    assert buckets(300) == [(1, 64), (65, 128), (129, 256), (257, 300)]


def test_position_losses_equal_a_direct_computation():
    model, rows = _model(), _rows()
    got = position_losses(model, rows, batch=2)
    for g, (loss, count) in zip(got, _direct(model, rows), strict=True):
        assert g["tokens"] == count and abs(g["loss"] - loss) <= 1e-12 * loss, (g, loss)


def case_positions(layout: str):
    import torch.distributed as dist

    from lasp.parallel.sp import apply_sp

    model, rows = _model(), _rows()
    want = _direct(model, rows)
    apply_sp(model, dist.group.WORLD, layout)
    got = position_losses(model, rows, group=dist.group.WORLD, layout=layout)
    for g, (loss, count) in zip(got, want, strict=True):
        assert g["tokens"] == count and abs(g["loss"] - loss) <= 1e-10 * loss, (g, loss)
    return got


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_position_losses_under_sp_equal_one_process(dist_pool, layout):
    a, b = dist_pool(2).run("tests.test_eval:case_positions", layout=layout)
    assert a == b


@pytest.fixture(scope="module")
def export_and_data(tmp_path_factory):
    from lasp.data import prepare

    root = tmp_path_factory.mktemp("eval")
    docs = []
    for i in range(4):  # bytes: 3 documents longer than 2 x 96 tokens, one short
        docs.append(root / f"d{i}.txt")
        docs[-1].write_text(("x = [i * %d for i in range(10)]\n" % i) * (12 if i else 1))
    prepare([str(d) for d in docs], str(root / "data"), progress=False)
    cfg = ModelConfig(**{**MODEL, "vocab_size": 257})
    torch.manual_seed(0)
    LinearLlama(cfg).save_pretrained(str(root / "export"), tokenizer={"name": "byte"})
    return root


def test_the_command_writes_jsonl_and_a_plot(export_and_data, tmp_path, capsys):
    from lasp.eval.__main__ import main

    root = export_and_data
    out, plot = tmp_path / "p.jsonl", tmp_path / "p.png"
    assert main(["positions", "--checkpoint", str(root / "export"), "--data", str(root / "data"), "--split",
                 "train", "--seq-len", "192", "--out", str(out), "--plot", str(plot)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["lo"], r["hi"]) for r in records] == buckets(192) and plot.stat().st_size > 0
    assert all(r["rows"] == 3 and r["tokens"] == 3 * (r["hi"] - r["lo"] + 1) for r in records), records


def test_bad_input_is_refused_up_front(export_and_data, tmp_path, capsys, monkeypatch):
    from lasp.eval.__main__ import main

    root = export_and_data
    ck, data = str(root / "export"), str(root / "data")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would: the length must split over 2 ranks
    refuse_all(main, [
        (["positions", "--checkpoint", ck, "--data", data, "--seq-len", "97", "--rows", "0"],
         "--seq-len 97", "--rows must be >= 1, got 0"),
        (["positions", "--checkpoint", str(tmp_path / "none"), "--data", str(tmp_path / "nodata"), "--seq-len", "96"],
         f"--checkpoint {tmp_path / 'none'}", "--data"),
        (["positions", "--checkpoint", ck, "--data", data, "--split", "train", "--seq-len", "4000"],
         "no document of split 'train' holds --seq-len + 1 = 4001 tokens"),
    ], capsys, watch=[root, tmp_path])
