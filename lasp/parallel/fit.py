"""The concrete layout for the ranks a launch gave: what lets one config run on a world that changed size
(an elastic restart onto fewer or more nodes; docs/checkpoints.md, "Elastic restarts").

- `parallel.dp: auto`: dp = world / (tp x sp x pp).
- `parallel.sp: [4, 2]`: the allowed SP degrees; the largest with which the whole layout has no problem is
  taken (a world of 6 with tp = pp = 1 and dp auto takes sp 2: 6 is not a multiple of 4).
- `parallel.micro_batch_size: N`: rows per rank per microbatch; the microbatches are global_batch / (dp x
  N), so a world that lost ranks accumulates more microbatches instead of putting more rows on each rank.

The global batch is data.global_batch whatever the layout, and the loader is a function of (seed, step):
the optimizer sees the same batches at every world size. A config with none of the three is checked as
it stands.
"""

import dataclasses

from lasp.model.config import ModelConfig, type_problems
from lasp.parallel.config import ParallelConfig

AUTO = "auto"


def _spec_problems(par: ParallelConfig) -> list[str]:
    """What is wrong with the elastic fields themselves (their types are type_problems')."""
    bad = type_problems(par, "parallel")
    p = [v for k, v in bad.items() if k in ("sp", "dp", "micro_batch_size")]
    if "sp" not in bad and isinstance(par.sp, list):
        if not par.sp:
            p.append("parallel.sp: an empty list allows no SP degree; give at least one, e.g. [2, 1]")
        if any(s < 1 for s in par.sp):
            p.append(f"parallel.sp: every allowed degree must be >= 1, got {par.sp}")
        if len(set(par.sp)) != len(par.sp):
            p.append(f"parallel.sp: the allowed degrees {par.sp} repeat one")
    if "dp" not in bad and isinstance(par.dp, str) and par.dp != AUTO:
        p.append(f"parallel.dp must be a whole number or auto, got {par.dp!r}")
    if "micro_batch_size" not in bad and par.micro_batch_size is not None and par.micro_batch_size < 1:
        p.append(f"parallel.micro_batch_size must be >= 1 or null, got {par.micro_batch_size}")
    if (par.dp == AUTO or isinstance(par.sp, list)) and isinstance(par.zero_stage, int) and par.zero_stage > 0:
        p.append(
            f"parallel.zero_stage {par.zero_stage} cannot follow a world that changes (parallel.dp auto or a list of "
            "parallel.sp): ZeRO checkpoints load only on the layout that saved them; use zero_stage 0"
        )
    return p


def _whole(par: ParallelConfig, name: str) -> int:
    """A size that did not type-check counts as 1 here: its own problem is reported by ParallelConfig."""
    value = getattr(par, name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def _candidate(
    par: ParallelConfig, sp: int, world: int | None, global_batch: int
) -> tuple[ParallelConfig | None, str, list[str]]:
    """The layout with SP degree `sp` on `world` ranks (None: a dry run's dp 1 for auto): (layout, how its
    dp and microbatches were derived, problems), or (None, why it cannot be formed, [])."""
    tp, pp = _whole(par, "tp"), _whole(par, "pp")
    per = tp * sp * pp
    how, problems = [], []
    dp = par.dp
    if dp == AUTO:
        if world is not None and world % per:
            return None, f"dp auto: tp x sp x pp = {tp} x {sp} x {pp} = {per} does not divide the {world} ranks", []
        dp = 1 if world is None else world // per
        how.append("dp auto = 1 (no world size given)" if world is None else f"dp auto = {world} / (tp x sp x pp)")
    microbatches, mbs = par.microbatches, par.micro_batch_size
    if isinstance(mbs, int) and mbs >= 1 and isinstance(dp, int) and dp >= 1 and global_batch >= 1:
        if global_batch % (dp * mbs):
            return (
                None,
                f"micro_batch_size: data.global_batch {global_batch} is not divisible by dp x micro_batch_size = "
                f"{dp} x {mbs}",
                [],
            )
        derived = global_batch // (dp * mbs)
        if microbatches not in (1, derived):
            problems.append(
                f"parallel.microbatches ({microbatches}) disagrees with parallel.micro_batch_size ({mbs}), which "
                f"makes {derived} (data.global_batch {global_batch} / (dp {dp} x {mbs})): give one of them"
            )
        microbatches = derived
        how.append(f"{derived} microbatch(es) of {mbs} row(s) per rank")
    layout = dataclasses.replace(par, sp=sp, dp=dp, microbatches=microbatches)
    return layout, ", ".join(how), problems


def fit(
    par: ParallelConfig, model: ModelConfig | None, world_size: int | None, seq_len: int, global_batch: int
) -> tuple[ParallelConfig | None, str, list[str]]:
    """(the layout to run, why, problems) for `world_size` ranks (None: the configured mesh, a dry run).
    The layout is None when nothing fits; the problems then name each allowed SP degree's."""
    spec = _spec_problems(par)
    if spec:
        rest = [v for k, v in type_problems(par, "parallel").items() if k not in ("sp", "dp", "micro_batch_size")]
        return None, "", spec + rest
    degrees = sorted(set(par.sp), reverse=True) if isinstance(par.sp, list) else [par.sp]
    tried: list[tuple[int, ParallelConfig | None, str, list[str]]] = []
    for sp in degrees:
        layout, how, problems = _candidate(par, sp, world_size, global_batch)
        if layout is not None:
            world = layout.world_size if world_size is None else world_size
            problems += layout.problems(model, world, seq_len, global_batch)
        tried.append((sp, layout, how, problems))
        if layout is not None and not problems:
            break
    sp, layout, how, problems = tried[-1]
    if layout is not None and not problems:
        return layout, _why(par, layout, world_size, how, tried[:-1]), []
    if len(tried) == 1:
        return layout, "", problems or [f"parallel.{how}"]
    # several degrees, none fits: what every one of them hit once, then each degree's own reasons
    common = [q for q in tried[0][3] if all(q in t[3] for t in tried)]
    if common and all(lay is not None and set(qs) <= set(common) for _, lay, _, qs in tried):
        return None, "", common  # nothing that depends on the degree
    own = [f"sp = {s}: " + ("; ".join(q for q in qs if q not in common) or how) for s, _, how, qs in tried]
    where = "the configured mesh" if world_size is None else f"{world_size} ranks"
    return None, "", common + [f"parallel.sp: none of the allowed degrees {par.sp} fits {where}: " + " | ".join(own)]


def _why(par: ParallelConfig, layout: ParallelConfig, world_size: int | None, how: str, refused: list) -> str:
    """One line: the layout and how each derived size came about ('as configured' when nothing did)."""
    world = layout.world_size if world_size is None else world_size
    text = f"{world} rank(s) = tp {layout.tp} x sp {layout.sp} x pp {layout.pp} x dp {layout.dp}"
    reasons = []
    if isinstance(par.sp, list):
        reasons.append(
            f"sp {layout.sp}, the largest of the allowed {par.sp} that fits"
            + "".join(f" (sp = {s}: {'; '.join(qs) or why})" for s, _, why, qs in refused)
        )
    reasons += [how] if how else []
    return text + (": " + ", ".join(reasons) if reasons else ", as configured")
