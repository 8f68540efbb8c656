"""python -m lasp.train --config FILE [--set a.b=value ...] [--dry-run | --check-only [--world-size N]]

Runs as a plain python process (one rank), under torchrun, or under the deepspeed launcher.

Exit status: 0 done (train.steps reached); 2 a bad config, a checkpoint that cannot be resumed, or a run
directory another run holds (nothing was trained); 1 a checkpoint that could not be saved (a full disk:
the checkpoints saved before it are kept) or any other error; 75 stopped early by SIGTERM / SIGINT /
train.max_minutes after saving a checkpoint (start it again to continue: EX_TEMPFAIL, "try again", which a
scheduler can requeue on).
"""

import argparse
import os
import sys
import warnings

# megatron-core warns that Transformer Engine and Apex are absent (it falls back to torch) and about
# config fields this project does not use.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

EXIT_STOPPED = 75
STATUS_DIR = "LASP_STATUS_DIR"  # set by lasp.train.launcher: where each rank leaves its exit status and message


def _status(code: int, message: str) -> int:
    """Leave `code` and `message` for the launcher (lasp.train.launcher), which repeats them last and exits
    with this status rather than torchrun's 1; returns `code`."""
    where = os.environ.get(STATUS_DIR)
    if where:
        # one attempt's files apart from another's: a restart renumbers the ranks, and a growth or a shrink
        # of an elastic job has every worker of the attempt before it leave a status (75, or the peer that went)
        attempt = f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}.{os.environ.get('MASTER_PORT', '0')}"
        with open(os.path.join(where, f"attempt-{attempt}-rank-{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(f"{code}\n{message}\n")
    return code


def _sizes(text: str) -> list[int]:
    """`--world-size 4` or `2,4,6` -> the sizes, each a whole number >= 1."""
    parts = text.split(",")
    if not all(part.strip().isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1, comma-separated, got {text!r}")
    return [int(part) for part in parts]


def _check_worlds(config: str, overrides: list[str], sizes: list[int]) -> int:
    """--check-only against several world sizes (an elastic launch may form any of them): 0 when the config
    fits every one, else 2 with every problem: those of the config and its data once, then each world
    size's own."""
    from lasp.train.config import ConfigError, load_config

    def problems(size: int, check_data: bool) -> list[str]:
        try:
            load_config(config, overrides, world_size=size, check_data=check_data)
        except ConfigError as e:
            return e.problems
        return []

    each = {size: problems(size, False) for size in sizes}
    shared = [q for q in problems(sizes[0], True) if all(q in each[n] for n in sizes) or q not in each[sizes[0]]]
    own = {n: [q for q in qs if q not in shared] for n, qs in each.items()}
    failed = [n for n in sizes if own[n]]
    if not shared and not failed:
        return 0
    every = ", ".join(map(str, sizes))
    lines = [f"error: {config}: the config must fit every world size the launch may form ({every})"]
    lines += [f"  {q}" for q in shared]
    lines += [f"  with {n} processes: {q}" for n in failed for q in own[n]]
    print("\n".join(lines), file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lasp.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", required=True, help="YAML file (sections: model, parallel, data, optim, schedule, train, logging)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set optim.lr=3e-4 (value parsed as YAML); repeatable",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, the mesh, parameters, FLOPs per token and memory per rank, then exit",
    )
    p.add_argument(
        "--check-only",
        action="store_true",
        help="check the config (and its data) against "
        "--world-size processes and exit: 0 if it can run, 2 with every problem; starts nothing",
    )
    p.add_argument(
        "--world-size",
        type=_sizes,
        metavar="N[,N...]",
        help="with --check-only: the processes the launcher will start (default: this launch's WORLD_SIZE); "
        "several, comma-separated: every world an elastic launch may form (each must fit)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    if args.world_size is not None and not args.check_only:
        p.error(f"--world-size {','.join(map(str, args.world_size))}: only with --check-only")

    from lasp.train.config import ConfigError, load_config
    from lasp.train.distributed import launch_env

    launch = launch_env()
    if args.check_only and args.world_size is not None and len(args.world_size) > 1:
        return _check_worlds(args.config, args.overrides, args.world_size)
    world_size = args.world_size[0] if args.world_size is not None else launch.world_size
    try:
        cfg = load_config(
            args.config, args.overrides, world_size=None if args.dry_run else world_size, check_data=not args.dry_run
        )
    except ConfigError as e:
        if launch.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return _status(2, f"error: {e}")
    if args.check_only:
        return 0
    if args.dry_run:
        from lasp.train.dryrun import report

        if launch.rank == 0:
            print(report(cfg))
        return 0

    import logging

    from lasp.distributed.agree import RanksDisagree
    from lasp.distributed.timeouts import CollectiveTimeout, PeerGone
    from lasp.train.checkpoint import CheckpointSaveError
    from lasp.train.ckpt_store import CheckpointError
    from lasp.train.loop import train
    from lasp.train.run_lock import RunDirLocked

    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # megatron and DeepSpeed talk at INFO
    logging.getLogger("lasp").setLevel(logging.INFO if launch.rank == 0 else logging.WARNING)
    try:
        state = train(cfg, launch)
    except (CheckpointError, ConfigError, RunDirLocked) as e:  # ConfigError here: what the kernel cannot do
        if launch.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return _status(2, f"error: {e}")
    except CheckpointSaveError as e:  # every rank raises it together; the run's checkpoints are kept
        if launch.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return _status(1, f"error: {e}")
    except (CollectiveTimeout, PeerGone, RanksDisagree) as e:  # every rank says what it saw
        print(f"error (rank {launch.rank}): {e}", file=sys.stderr)
        return _status(1, f"error (rank {launch.rank}): {e}")
    if launch.rank == 0:
        end = f"stopped by {state.stopped_by}" if state.stopped_by else "done"
        print(
            f"{end}: {state.step} steps, {state.tokens:,} tokens, loss {state.first_loss:.4f} (first step) -> "
            f"{state.last_loss:.4f} (last step)"
            + ("" if state.last_eval_loss is None else f", eval loss {state.last_eval_loss:.4f}")
        )
    if state.stopped_by:
        return _status(
            EXIT_STOPPED,
            f"stopped by {state.stopped_by} after step {state.step}, with a checkpoint: "
            "start the same command again to continue",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
