"""python -m lasp.train --config FILE [--set a.b=value ...] [--dry-run]

Runs as a plain python process (one rank), under torchrun, or under the deepspeed launcher.

Exit status: 0 done (train.steps reached); 2 a bad config or a checkpoint that cannot be resumed (nothing
was trained); 75 stopped early by SIGTERM / SIGINT / train.max_minutes after saving a checkpoint (start it
again to continue: EX_TEMPFAIL, "try again", which a scheduler can requeue on); 1 any other error.
"""

import argparse
import sys
import warnings

# megatron-core warns that Transformer Engine and Apex are absent (it falls back to torch) and about
# config fields this project does not use.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

EXIT_STOPPED = 75


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lasp.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file (sections: model, parallel, data, optim, "
                   "schedule, train, logging)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set optim.lr=3e-4 (value parsed as YAML); repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, the mesh, parameters, "
                   "FLOPs per token and memory per rank, then exit")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)

    from lasp.train.config import ConfigError, load_config
    from lasp.train.distributed import launch_env

    launch = launch_env()
    try:
        cfg = load_config(args.config, args.overrides, world_size=None if args.dry_run else launch.world_size,
                          check_data=not args.dry_run)
    except ConfigError as e:
        if launch.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from lasp.train.dryrun import report

        if launch.rank == 0:
            print(report(cfg))
        return 0

    import logging

    from lasp.distributed.agree import RanksDisagree
    from lasp.distributed.timeouts import CollectiveTimeout
    from lasp.train.ckpt_store import CheckpointError
    from lasp.train.loop import train

    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # megatron and DeepSpeed talk at INFO
    logging.getLogger("lasp").setLevel(logging.INFO if launch.rank == 0 else logging.WARNING)
    try:
        state = train(cfg, launch)
    except (CheckpointError, ConfigError) as e:  # ConfigError here: what the kernel cannot do
        if launch.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except (CollectiveTimeout, RanksDisagree) as e:  # every rank says what it saw
        print(f"error (rank {launch.rank}): {e}", file=sys.stderr)
        return 1
    if launch.rank == 0:
        end = f"stopped by {state.stopped_by}" if state.stopped_by else "done"
        print(f"{end}: {state.step} steps, {state.tokens:,} tokens, loss {state.first_loss:.4f} (first step) -> "
              f"{state.last_loss:.4f} (last step)"
              + ("" if state.last_eval_loss is None else f", eval loss {state.last_eval_loss:.4f}"))
    return EXIT_STOPPED if state.stopped_by else 0


if __name__ == "__main__":
    sys.exit(main())
