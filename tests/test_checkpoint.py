"""Checkpoints: exact resume, atomic commits, clear errors, and resharding to another layout (CPU, gloo).

World-1 runs call the trainer in this process; multi-rank runs go through the tests/dist.py pool, whose
ranks call the same `train` on the pool's process group.
"""

import glob
import json
import os
import re
import shutil

import pytest
import torch
import yaml

from lasp.train import ckpt_store
from lasp.train.artifacts import read_tensors
from lasp.train.ckpt_store import CheckpointError
from lasp.train.config import ConfigError, resolve
from lasp.train.distributed import Launch
from tests.refusals import refuse_all, tree
from tests.test_train import TINY as TRAIN_TINY

TINY = {
    **TRAIN_TINY,
    "checkpoint": {"interval": 2, "keep_last": 0},
    "logging": {"progress": False, "tensorboard": False, "plot": False},
}


def _cfg(base: dict, **sections) -> dict:
    cfg = {k: dict(v) for k, v in base.items()}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def run(cfg: dict, world_size: int = 1):
    """Train `cfg` on this rank (the process group, if any, already exists) -> rank 0's TrainState."""
    import torch.distributed as dist

    from lasp.train.loop import train

    rank = dist.get_rank() if dist.is_initialized() else 0
    state = train(resolve(cfg, "test", world_size), Launch(rank, world_size, rank, world_size > 1))
    return state


def rows(run_dir: str, kind: str = "train") -> list[tuple]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [
            (r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss"))
            for r in map(json.loads, f)
            if r["kind"] == kind
        ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus: an epoch of 64-token sequences lasts a few steps of 4 sequences."""
    from lasp.data import prepare

    out = tmp_path_factory.mktemp("corpus")
    src = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    docs = []
    for i, path in enumerate(src[:6]):
        (out / f"{i}.txt").write_text(open(path).read()[:400])
        docs.append(str(out / f"{i}.txt"))
    prepare(docs, str(out / "data"), val_fraction=0.0, progress=False)
    return str(out / "data")


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    from lasp.data import prepare

    out = tmp_path_factory.mktemp("big") / "data"
    prepare(
        sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:8],
        str(out),
        val_fraction=0.2,
        progress=False,
    )
    return str(out)


def _tiny(tmp_path, data, name, **sections):
    cfg = _cfg(TINY, data={"path": data}, logging={"run_dir": str(tmp_path / name)}, **sections)
    return cfg


def test_two_resumes_in_a_row_across_an_epoch_end_give_bit_identical_losses(tmp_path, corpus):
    from lasp.data import TokenData

    sections = dict(
        parallel={"microbatches": 2}, train={"steps": 9, "eval_interval": 0}, checkpoint={"interval": 3, "keep_last": 2}
    )
    ref = _tiny(tmp_path, corpus, "ref", **sections)
    run(ref)
    want = rows(ref["logging"]["run_dir"])
    samples = TokenData(corpus, "train").num_samples(64)
    assert 2 * 4 < samples < 9 * 4, samples  # the resumed part crosses the end of an epoch of the data

    cfg = _tiny(tmp_path, corpus, "resumed", **sections)
    cfg["train"]["max_minutes"] = 1e-9  # every attempt stops after its first step, saves, and exits
    first = run(cfg)
    assert first.step == 1 and first.stopped_by == "train.max_minutes"
    second = run(cfg)  # resume 1: from step 1 (mid-interval), one more step
    assert second.step == 2
    root = os.path.join(cfg["logging"]["run_dir"], "checkpoints")
    # a crash in the middle of a later save leaves a temporary directory and a directory without marker
    os.makedirs(os.path.join(root, "step-00000003.tmp", "rng"))
    os.makedirs(os.path.join(root, "step-00000007"))
    open(os.path.join(root, "step-00000007", "__0_0.distcp"), "w").write("half")
    assert [s for s, _ in ckpt_store.list_checkpoints(root)] == [1, 2]
    cfg["train"]["max_minutes"] = None
    third = run(cfg)  # resume 2: from step 2 to the end
    assert third.step == 9 and third.stopped_by is None
    assert rows(cfg["logging"]["run_dir"]) == want  # every step, bit for bit
    # keep_last 2, and step 2, which this attempt started from, is never purged by it; leftovers purged
    assert [s for s, _ in ckpt_store.list_checkpoints(root)] == [2, 6, 9]
    assert not os.path.exists(os.path.join(root, "step-00000003.tmp"))


def test_a_background_save_resumes_exactly(tmp_path, corpus):
    cfg = _tiny(tmp_path, corpus, "async", checkpoint={"interval": 2, "keep_last": 0, "async_save": True})
    run(cfg)
    want = rows(cfg["logging"]["run_dir"])
    root = os.path.join(cfg["logging"]["run_dir"], "checkpoints")
    assert [s for s, _ in ckpt_store.list_checkpoints(root)] == [2, 4, 6]
    shutil.rmtree(ckpt_store.step_dir(root, 6))
    assert run(cfg).step == 6
    assert rows(cfg["logging"]["run_dir"]) == want


def test_a_finished_run_started_again_says_so_and_trains_nothing(tmp_path, corpus, capsys):
    cfg = _tiny(tmp_path, corpus, "done", train={"steps": 2, "eval_interval": 0})
    run(cfg)
    before = rows(cfg["logging"]["run_dir"])
    state = run(cfg)
    assert state.step == 2 and rows(cfg["logging"]["run_dir"]) == before
    assert "nothing to train" in capsys.readouterr().out


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus):
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    tmp = tmp_path_factory.mktemp("saved")
    cfg = _tiny(tmp, corpus, "run", train={"steps": 2, "eval_interval": 0}, checkpoint={"interval": 1})
    run(cfg)
    return cfg, os.path.join(cfg["logging"]["run_dir"], "checkpoints")


def _copy(saved, tmp_path, step=2):
    cfg, root = saved
    dst = tmp_path / f"step-{step:08d}"
    shutil.copytree(ckpt_store.step_dir(root, step), dst)
    new = _cfg(cfg, logging={"run_dir": str(tmp_path / "again")}, train={"resume": str(dst), "steps": 3})
    return new, str(dst)


def test_a_missing_or_truncated_shard_is_an_error_naming_the_file(tmp_path, saved):
    cfg, path = _copy(saved, tmp_path)
    shard = os.path.join(path, "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp has \d+ bytes, the manifest says \d+"):
        run(cfg)
    os.remove(shard)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is missing"):
        run(cfg)
    os.remove(os.path.join(path, "COMMITTED"))
    with pytest.raises(ConfigError, match=r"train.resume: \S+ has no COMMITTED marker"):  # before any work
        run(cfg)


def test_another_model_shape_or_vocabulary_is_an_error_not_a_fresh_start(tmp_path, saved):
    cfg, path = _copy(saved, tmp_path)
    wider = _cfg(cfg, model={"hidden_size": 64, "ffn_hidden_size": 128})
    with pytest.raises(CheckpointError, match=r"model.hidden_size: the checkpoint has 32, this run 64") as e:
        run(wider)
    assert "model.ffn_hidden_size" in str(e.value)  # every difference at once
    with pytest.raises(CheckpointError, match=r"model.vocab_size: the checkpoint has 258, this run 300"):
        run(_cfg(cfg, model={"vocab_size": 300}))
    # the same model trained on another tokenizer's ids: rewrite the saved tokenizer (and the manifest)
    state = ckpt_store.read_state(path)
    state["tokenizer"] = {"name": "tokenizer.json", "vocab_size": 258, "eos_id": 0, "sha256": "ab" * 32}
    os.remove(os.path.join(path, ckpt_store.MARKER))
    ckpt_store.write_file(os.path.join(path, ckpt_store.STATE_FILE), json.dumps(state))
    os.rename(path, path + ".tmp")
    ckpt_store.commit(os.path.dirname(path), 2, keep_last=0)
    with pytest.raises(CheckpointError, match="a different vocabulary"):
        run(cfg)


def test_resume_never_refuses_a_directory_with_checkpoints(saved):
    cfg, _ = saved
    with pytest.raises(CheckpointError, match="train.resume = never, but .* holds checkpoints"):
        run(_cfg(cfg, train={"resume": "never"}))


def test_cli_exits_2_with_the_checkpoint_error(tmp_path, saved):
    from lasp.train.__main__ import main

    cfg, path = _copy(saved, tmp_path)
    os.remove(os.path.join(path, "__0_0.distcp"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2


def test_a_checkpoint_damaged_in_place_is_refused_naming_the_file(tmp_path, saved, capsys):
    from lasp.train.__main__ import main

    cfg, path = _copy(saved, tmp_path)
    shard = os.path.join(path, "__0_0.distcp")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:  # one byte flipped in the middle: the size is unchanged
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert os.path.getsize(shard) == size
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"__0_0\.distcp has sha256 [0-9a-f]{16}\.\.\., the manifest says [0-9a-f]{16}", err), err
    assert "checkpoint.verify=false" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "again" / "metrics.jsonl")  # refused before any work

    # checkpoint.verify=false skips the sha256: what the damage breaks is then one message, not a traceback
    cfg["checkpoint"]["verify"] = False
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path} could not be read" in err and "Traceback" not in err, err
    with open(shard, "r+b") as f:
        f.seek(size // 2)
        f.write(byte)
    rng = os.path.join(path, "rng", "rank-00000.pt")
    open(rng, "r+b").write(b"\0" * 16)
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "rank-00000.pt is unreadable or not this trainer's RNG state" in err and "Traceback" not in err


def test_two_runs_in_one_directory_the_second_is_refused_and_changes_nothing(tmp_path, saved, capsys):
    import socket

    from lasp.train.__main__ import main
    from lasp.train.run_lock import RunLock

    cfg, _ = saved
    run_dir = tmp_path / "shared"
    shutil.copytree(cfg["logging"]["run_dir"], run_dir)
    new = _cfg(cfg, logging={"run_dir": str(run_dir)}, train={"steps": 4})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(new))
    first = RunLock(str(run_dir))  # the lock a running trainer holds (flock: another open file conflicts)
    assert first.acquire() is None
    before = tree(run_dir)
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in err, err
    assert tree(run_dir) == before  # no metrics, checkpoint or temporary directory touched

    # nor a run of another run directory that names this one's checkpoints as its checkpoint.dir
    beside = _cfg(new, logging={"run_dir": str(tmp_path / "beside")}, checkpoint={"dir": str(run_dir / "checkpoints")})
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(beside))
    held = RunLock(str(run_dir / "checkpoints"))  # the first run holds its checkpoint.dir's lock too
    held.acquire()
    before = tree(run_dir)
    assert main(["--config", str(tmp_path / "b.yaml")]) == 2
    assert f"{run_dir / 'checkpoints'} is in use by another run" in capsys.readouterr().err
    assert tree(run_dir) == before
    held.release()

    first.release()
    state = run(new)  # released: the run goes on from the committed step 2
    assert state.step == 4 and os.path.getsize(run_dir / "run.lock") == 0  # a clean end empties the lock

    # a run killed with -9 leaves its name in the file but no lock: the next start names it and takes over
    (run_dir / "run.lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7, "started": "2026-12-05T10:00:00+00:00"})
    )
    capsys.readouterr()
    run(_cfg(new, train={"steps": 5}))
    out = capsys.readouterr().out
    assert f"the run of pid {2**22 + 7} on host {socket.gethostname()}" in out
    assert "ended without releasing the lock (no longer running" in out


def test_a_roll_back_moves_the_abandoned_branch_aside_and_a_restart_follows_the_new_one(tmp_path, corpus, capsys):
    sections = dict(
        train={"steps": 6, "eval_interval": 0}, checkpoint={"interval": 2, "keep_last": 1}, schedule={"decay_steps": 12}
    )  # the learning rate does not depend on train.steps
    ref = _tiny(tmp_path, corpus, "ref", **_cfg(sections, train={"steps": 8}))
    run(ref)
    cfg = _tiny(tmp_path, corpus, "run", **sections)
    run(cfg)  # steps 1-6; keep_last 1 leaves step 6
    root = os.path.join(cfg["logging"]["run_dir"], "checkpoints")
    assert [s for s, _ in ckpt_store.list_checkpoints(root)] == [6]
    cfg["checkpoint"]["keep_last"] = 0
    run(_cfg(cfg, train={"steps": 8}))  # on to step 8, keeping 6 and 8
    assert [s for s, _ in ckpt_store.list_checkpoints(root)] == [6, 8]

    capsys.readouterr()
    back = _cfg(cfg, train={"resume": ckpt_store.step_dir(root, 6), "steps": 10}, checkpoint={"keep_last": 1})
    back["train"]["max_minutes"] = 1e-9  # the rolled-back run trains one step (7), saves it, and stops
    state = run(back)
    assert state.step == 7 and state.stopped_by == "train.max_minutes"
    out = capsys.readouterr().out
    moved = re.search(
        r"rolling back to step 6 \(\S+\): the later step-00000008 of the abandoned branch are "
        r"moved to (\S+) with its 2 metrics rows \(kept",
        out,
    )
    assert moved, out
    assert os.path.isfile(os.path.join(moved.group(1), "step-00000008", ckpt_store.MARKER))  # kept whole
    assert [s for s, *_ in rows(moved.group(1))] == [7, 8]  # the abandoned branch's history, beside it
    # keep_last 1 kept the new step 7 and the step the roll-back started from; step 8 is not a checkpoint here
    assert [s for s, _ in ckpt_store.list_checkpoints(root)] == [6, 7]

    state = run(_cfg(cfg, train={"steps": 8}))  # a plain restart: the new branch (7), not the abandoned 8
    assert state.step == 8
    assert "resuming from " + ckpt_store.step_dir(root, 7) in capsys.readouterr().out
    assert rows(cfg["logging"]["run_dir"]) == rows(ref["logging"]["run_dir"])  # the same steps, bit for bit


@pytest.mark.parametrize("failure", ["enospc", "no-errno"])
def test_a_full_disk_during_a_save_says_so_and_keeps_the_last_good_checkpoint(
    tmp_path, saved, capsys, monkeypatch, failure
):
    import errno
    from collections import namedtuple

    from torch.distributed.checkpoint import FileSystemWriter

    from lasp.train import checkpoint
    from lasp.train.__main__ import main

    cfg, _ = saved
    run_dir = tmp_path / "full"
    shutil.copytree(cfg["logging"]["run_dir"], run_dir)
    new = _cfg(cfg, logging={"run_dir": str(run_dir)}, train={"steps": 3})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(new))

    def no_space(self, plan, planner):
        if failure == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(str(self.path), "__0_0.distcp"))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # torch.save's

    monkeypatch.setattr(FileSystemWriter, "write_data", no_space)
    if failure == "no-errno":  # what a real full filesystem showed (a 14 MiB tmpfs): no errno, nothing free
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(14 << 20, 14 << 20, 0))
    assert main(["--config", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    root = os.path.join(run_dir, "checkpoints")
    assert f"checkpoint step 3 could not be saved: the disk is full (no space left on device under {root}" in err
    assert f"MiB free); the last good checkpoint, {ckpt_store.step_dir(root, 2)}, is kept" in err, err
    assert "Traceback" not in err
    assert [s for s, _ in ckpt_store.list_checkpoints(root)] == [1, 2]
    assert not os.path.exists(ckpt_store.tmp_dir(root, 3))  # the failed save's own directory is removed
    ckpt_store.verify(ckpt_store.step_dir(root, 2))  # and the last good one is whole


def test_commit_is_the_last_step_and_purges_only_after_it(tmp_path):
    root = str(tmp_path)
    for step in (1, 2, 3):
        tmp = ckpt_store.prepare(root, step)
        open(os.path.join(tmp, "x"), "w").write("data")
        assert [s for s, _ in ckpt_store.list_checkpoints(root)] == list(
            range(max(1, step - 2), step)
        )  # the new one is not there yet
        ckpt_store.commit(root, step, keep_last=2)
    assert [s for s, _ in ckpt_store.list_checkpoints(root)] == [2, 3]
    assert ckpt_store.verify(ckpt_store.step_dir(root, 3))["files"] == {"x": 4}
    assert ckpt_store.resolve_resume("auto", root) == ckpt_store.step_dir(root, 3)
    assert ckpt_store.resolve_resume("auto", str(tmp_path / "none")) is None


# -- resharding (pool cases) -----------------------------------------------------------------------------


def case_train(cfg: dict, world_size: int):
    state = run(cfg, world_size)
    return state.step, state.last_loss


def case_reload(cfg: dict, src: str):
    """Load checkpoint `src` into cfg's layout and save it again at once, under cfg's checkpoint.dir."""
    import torch.distributed as dist

    from lasp.kernels import get_kernel
    from lasp.parallel import init_groups
    from lasp.train.checkpoint import Checkpointer
    from lasp.train.loop import build_stage

    c = resolve(cfg, "test", dist.get_world_size())
    groups = init_groups(c.parallel)
    stage, optimizer, engine = build_stage(c, groups, torch.device("cpu"), get_kernel("torch"))
    tokenizer = ckpt_store.read_state(src)["tokenizer"]
    ck = Checkpointer(c, stage, optimizer, engine, groups, torch.device("cpu"), tokenizer, say=lambda m: None)
    ck.save(ck.load(src))
    dist.barrier()
    return True


RESHARD = [
    # LoRA adapters split with their layers (column-parallel B, row-parallel A) and whole (A, B) at TP = 2
    ({"tp": 2, "sp": 2}, {"tp": 1, "sp": 4}, 4, {"lora_rank": 4, "lora_targets": "q_proj,o_proj,up_proj,down_proj"}),
    ({"pp": 2}, {"pp": 1, "dp": 2}, 2, {}),
    ({"sp": 2}, {"sp": 1, "dp": 2}, 2, {}),
    # the delta rule's head-split parameters (convolutions, A_log, dt_bias) gathered from TP = 2
    ({"tp": 2, "sp": 2}, {"tp": 1, "sp": 4}, 4, {"linear_variant": "gated_deltanet"}),
    # experts split over EP gathered on every rank, and (with the expert bias, a buffer) from EP x SP x TP
    # to SP (dp stays: the balancing losses are per DP rank)
    ({"dp": 2, "ep": 2}, {"dp": 2}, 2, {"moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 16}}),
    (
        {"sp": 2, "tp": 2, "ep": 2},
        {"sp": 4},
        4,
        {
            "moe": {
                "num_experts": 4,
                "top_k": 2,
                "ffn_hidden_size": 16,
                "router": "sigmoid",
                "expert_bias": True,
                "shared_ffn_hidden_size": 8,
                "pattern": "DM",
            }
        },
    ),
]


RESHARD_IDS = [
    "lora-tp2sp2-to-sp4",
    "pp2-to-dp2",
    "sp2-to-sp1",
    "gated-deltanet-tp2sp2-to-sp4",
    "moe-ep2-to-ep1",
    "moe-ep2sp2tp2-to-sp4",
]


@pytest.mark.parametrize(
    "old,new,world,extra",
    [  # the inner loop (-m "not slow") keeps sp2-to-sp1
        pytest.param(*case, id=name, marks=[] if name == "sp2-to-sp1" else [pytest.mark.slow])
        for case, name in zip(RESHARD, RESHARD_IDS)
    ],
)
def test_a_checkpoint_reshards_to_another_layout(dist_pool, tmp_path, big_corpus, old, new, world, extra):
    pool = dist_pool(world)
    model = {
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "hidden_size": 32,
        "layer_pattern": "LLS",
        "linear_variant": "lightning",
        **extra,
    }
    base = _cfg(
        TINY, model=model, data={"path": big_corpus}, train={"steps": 2, "eval_interval": 0}, checkpoint={"interval": 1}
    )
    saved = _cfg(base, parallel=old, logging={"run_dir": str(tmp_path / "old")})
    pool.run("tests.test_checkpoint:case_train", cfg=saved, world_size=world)
    src = ckpt_store.step_dir(str(tmp_path / "old" / "checkpoints"), 2)
    if "moe" in extra:  # each step's MoE statistics are logged
        with open(tmp_path / "old" / "metrics.jsonl") as f:
            step = [r for r in map(json.loads, f) if r["kind"] == "train"][-1]
        assert step["moe_load_max"] >= 1.0 and step["moe_aux_loss"] > 0 and "moe_load_L3" in step, step

    # 1. loading under the new layout and saving again gives back every tensor exactly
    again = _cfg(base, parallel=new, checkpoint={"dir": str(tmp_path / "again")})
    pool.run("tests.test_checkpoint:case_reload", cfg=again, src=src)
    copy = ckpt_store.step_dir(str(tmp_path / "again"), 2)
    for prefix in ("model/", "optim/"):
        a, b = read_tensors(src, prefix), read_tensors(copy, prefix)
        assert a.keys() == b.keys()
        if "moe" in extra and prefix == "model/":  # every expert, and the expert biases, once
            assert sum(".experts." in k for k in a) == 4 * 3 * (2 if extra["moe"].get("pattern") == "DM" else 4)
            assert sum(k.endswith(".expert_bias") for k in a) == (2 if extra["moe"].get("expert_bias") else 0)
        for k in a:
            assert torch.equal(a[k], b[k]), k

    # 2. the next step on the new layout matches a run on the new layout that loads nothing... from the
    #    same weights: an uninterrupted run on the new layout, to float32 rounding
    resumed = _cfg(base, parallel=new, train={"steps": 3, "resume": src}, logging={"run_dir": str(tmp_path / "new")})
    pool.run("tests.test_checkpoint:case_train", cfg=resumed, world_size=world)
    straight = _cfg(base, parallel=new, train={"steps": 3}, logging={"run_dir": str(tmp_path / "straight")})
    pool.run("tests.test_checkpoint:case_train", cfg=straight, world_size=world)
    got, want = rows(str(tmp_path / "new")), rows(str(tmp_path / "straight"))
    assert [r[0] for r in got] == [3]
    assert abs(got[0][1] - want[-1][1]) <= 1e-6 * abs(want[-1][1]), (got, want)
    a = read_tensors(ckpt_store.step_dir(str(tmp_path / "new" / "checkpoints"), 3), "optim/")
    b = read_tensors(ckpt_store.step_dir(str(tmp_path / "straight" / "checkpoints"), 3), "optim/")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# -- export, ZeRO ----------------------------------------------------------------------------------------


def case_logits(cfg: dict, src: str, tokens: torch.Tensor):
    """The full logits [B, N, vocab] of the model in checkpoint `src`, run under cfg's layout (pp = 1):
    each rank's vocabulary shard of its tokens, gathered over TP and SP, back in sequence order."""
    import torch.distributed as dist

    from lasp.kernels import get_kernel
    from lasp.parallel import init_groups, local_microbatches
    from lasp.train.checkpoint import Checkpointer
    from lasp.train.loop import build_stage

    c = resolve(cfg, "test", dist.get_world_size())
    groups = init_groups(c.parallel)
    stage, optimizer, engine = build_stage(c, groups, torch.device("cpu"), get_kernel("torch"))
    tokenizer = ckpt_store.read_state(src)["tokenizer"]
    Checkpointer(c, stage, optimizer, engine, groups, torch.device("cpu"), tokenizer, say=lambda m: None).load(src)
    (mb,) = local_microbatches(tokens, c.parallel, groups)
    with torch.no_grad():
        logits = stage.lm_head(stage(mb["tokens"], mb["positions"]))  # [B, T_local, vocab / tp]
    parts = [torch.empty_like(logits) for _ in range(c.parallel.tp)]
    dist.all_gather(parts, logits.contiguous(), group=groups.tp)
    logits = torch.cat(parts, -1)
    sp = c.parallel.sp
    chunks, where = (
        [torch.empty_like(logits) for _ in range(sp)],
        [torch.empty_like(mb["positions"]) for _ in range(sp)],
    )
    dist.all_gather(chunks, logits, group=groups.sp)
    dist.all_gather(where, mb["positions"].contiguous(), group=groups.sp)
    full = torch.empty(tokens.shape[0], tokens.shape[1] - 1, logits.shape[-1])
    for chunk, pos in zip(chunks, where):
        full[:, pos[0]] = chunk
    return full


def test_export_of_a_tp2_sp2_checkpoint_gives_the_distributed_logits(dist_pool, tmp_path, big_corpus):
    from lasp.export import main as export
    from lasp.model import from_pretrained

    pool = dist_pool(4)
    model = {"num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "hidden_size": 32, "layer_pattern": "LLS"}
    cfg = _cfg(
        TINY,
        model=model,
        data={"path": big_corpus},
        train={"steps": 2, "eval_interval": 0},
        parallel={"tp": 2, "sp": 2},
        logging={"run_dir": str(tmp_path / "run")},
    )
    pool.run("tests.test_checkpoint:case_train", cfg=cfg, world_size=4)
    src = ckpt_store.step_dir(str(tmp_path / "run" / "checkpoints"), 2)
    tokens = torch.randint(0, 257, (2, 65), generator=torch.Generator().manual_seed(0))
    want = pool.run("tests.test_checkpoint:case_logits", cfg=cfg, src=src, tokens=tokens)[0]
    assert export(["--checkpoint", src, "--out", str(tmp_path / "export")]) == 0
    single = from_pretrained(str(tmp_path / "export"))
    with torch.no_grad():
        got = single(tokens[:, :-1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert json.load(open(tmp_path / "export" / "config.json"))["tokenizer"]["name"] == "byte"


@pytest.mark.slow
def test_zero_checkpoints_resume_exactly_and_refuse_another_layout(dist_pool, tmp_path, big_corpus):
    from lasp.train.artifacts import consolidate

    pool = dist_pool(2)
    base = _cfg(
        TINY,
        data={"path": big_corpus},
        train={"eval_interval": 0},
        parallel={"dp": 2, "zero_stage": 2},
        checkpoint={"interval": 2},
    )
    straight = _cfg(base, train={"steps": 3}, logging={"run_dir": str(tmp_path / "straight")})
    pool.run("tests.test_checkpoint:case_train", cfg=straight, world_size=2)
    first = _cfg(base, train={"steps": 2}, logging={"run_dir": str(tmp_path / "run")})
    pool.run("tests.test_checkpoint:case_train", cfg=first, world_size=2)
    pool.run("tests.test_checkpoint:case_train", cfg=_cfg(first, train={"steps": 3}), world_size=2)
    assert rows(str(tmp_path / "run")) == rows(str(tmp_path / "straight"))

    src = ckpt_store.step_dir(str(tmp_path / "run" / "checkpoints"), 2)
    other = _cfg(
        base,
        parallel={"dp": 2, "zero_stage": 1},
        train={"steps": 4, "resume": src},
        logging={"run_dir": str(tmp_path / "other")},
    )
    with pytest.raises(
        AssertionError,
        match=r"CheckpointError: .*\n.*a ZeRO checkpoint .* loads only on the layout that saved it; changed: "
        r"parallel.zero_stage 2 -> 1",
    ):
        pool.run("tests.test_checkpoint:case_train", cfg=other, world_size=2)
    cfg, sd, _ = consolidate(ckpt_store.step_dir(str(tmp_path / "run" / "checkpoints"), 3))
    assert sd["embed.weight"].shape == (cfg.vocab_size, cfg.hidden_size)


# -- the CLIs given a wrong path (lasp.export, lasp.generate): exit 2, every problem, nothing changed ------


def test_export_and_generate_refuse_wrong_paths_before_any_work(tmp_path, saved, capsys):
    from lasp.export import main as export
    from lasp.generate import main as generate

    _, root = saved
    run_dir, step = os.path.dirname(root), ckpt_store.step_dir(root, 2)
    (tmp_path / "a-file").write_text("x")
    unfinished = tmp_path / "step-00000009"
    unfinished.mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    out = ["--out", str(tmp_path / "e")]
    refuse_all(
        export,
        [
            (
                ["--checkpoint", run_dir, *out],
                f"is a run directory, not a checkpoint; its newest committed checkpoint is {step}",
            ),
            (["--checkpoint", root, *out], "is a directory of checkpoints, not one"),
            (["--checkpoint", str(tmp_path / "none"), *out], "does not exist"),
            (["--checkpoint", str(tmp_path / "a-file"), *out], "is a file, not a checkpoint directory"),
            (["--checkpoint", str(unfinished), *out], "a save still being written, or one that did not finish"),
            (["--checkpoint", step, "--out", str(tmp_path / "a-file")], "it is not a directory"),
            (["--checkpoint", step, "--out", str(tmp_path / "a-file" / "sub")], "is not a directory"),
            (
                ["--checkpoint", step, "--out", str(tmp_path / "full"), "--force"],
                "is not empty and has no "
                "lasp_export.json and no config.json of a LASP model (it holds keep.txt): "
                "--force replaces only an export",
            ),
            (["--checkpoint", step, "--out", os.path.join(step, "export")], "lies inside the input"),
            (["--checkpoint", step, "--out", step, "--force"], "holds trainer checkpoints"),
            (["--checkpoint", step, "--out", run_dir, "--force"], "holds trainer checkpoints"),
            (["--checkpoint", step], "the following arguments are required: --out"),
            (
                ["--checkpoint", run_dir, "--out", str(tmp_path / "full")],  # every problem at once
                "2 problems",
                "run directory",
                "--force",
            ),
        ],
        capsys,
        watch=[tmp_path, run_dir],
    )  # nothing written, nothing touched
    refuse_all(
        generate,
        [
            (["--checkpoint", run_dir, "--prompt", "x"], f"its newest committed checkpoint is {step}"),
            (["--checkpoint", str(tmp_path / "a-file"), "--prompt", "x"], "is a file"),
            (["--checkpoint", str(unfinished), "--prompt", "x"], "a save still being written"),
            (["--checkpoint", step, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
            (
                ["--checkpoint", step, "--prompt", "x", "--top-p", "0", "--temperature", "-1"],  # every problem at once
                "2 problem(s)",
                "--temperature must be a finite number >= 0",
                "--top-p must be in (0, 1], got 0.0",
            ),
        ],
        capsys,
        watch=[tmp_path, run_dir],
    )


def test_export_replaces_an_existing_export_only_with_force(tmp_path, saved, capsys):
    from lasp.export import main as export

    _, root = saved
    out = tmp_path / "export"
    assert export(["--checkpoint", ckpt_store.step_dir(root, 1), "--out", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    refuse_all(export, [(["--checkpoint", ckpt_store.step_dir(root, 2), "--out", str(out)], "pass --force")], capsys)
    assert (out / "model.safetensors").read_bytes() == first
    (out / "notes.txt").write_text("mine, not the export's")
    refuse_all(
        export,
        [
            (
                ["--checkpoint", ckpt_store.step_dir(root, 2), "--out", str(out), "--force"],
                "also holds what the tool did not write (notes.txt): --force does not remove them",
            )
        ],
        capsys,
    )
    assert (out / "notes.txt").exists() and (out / "model.safetensors").read_bytes() == first
    (out / "notes.txt").unlink()
    assert export(["--checkpoint", ckpt_store.step_dir(root, 2), "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() != first
    assert f"removed the previous {out}: 3 file(s)" in capsys.readouterr().err  # said, one line
    record = json.loads((out / "lasp_export.json").read_text())
    assert record["tokenizer"] == ckpt_store.read_state(ckpt_store.step_dir(root, 2))["tokenizer"]
    assert sorted(record["files"]) == sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left
