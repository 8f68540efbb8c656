"""Peak memory of the LM head + cross-entropy alone (forward and backward) on CPU: chunked against plain.

    python -m lasp.bench.loss_memory [--tokens 65536 --vocab 32768 --hidden 1024 --chunk-tokens 4096]
                                     [--method auto|measured|fake] [--validate] [--out results/loss_memory]

Plain is `lm_loss_sum(hidden @ weight.T, labels)` (the [N, V] logits, their log-softmax and gradients
live at once); chunked is `chunked_lm_loss_sum`, which holds one [chunk_tokens, V] buffer at a time.
A peak is the bytes torch allocates while the step runs, above what was allocated before (inputs
excluded, gradients included). Each figure comes from one of two methods, recorded in the row as
`plain_method` / `chunked_method`:

- "measured": the step runs for real and the peak is read from the profiler's allocation events (a
  process-wide figure such as the RSS high-water mark cannot be reset between the two runs);
- "fake-tensor tracked": the same step runs on fake tensors (torch's FakeTensorMode: shapes, dtypes and
  storages, no data) under torch's MemTracker, which adds each op's output storages as they appear and
  drops them when they are freed; the peak is the highest live total, less the inputs.

`--method auto` (the default) measures a run when its estimated need (plain: 3 x tokens x vocab x 4
bytes, chunked: 2 x chunk_tokens x vocab x 4, plus the inputs and their gradients) is under half of
MemAvailable (/proc/meminfo), and tracks it on fake tensors otherwise: the plain run at the defaults
needs about 24 GiB. `--validate` runs both methods on both paths and reports how far apart they are
(within about 1% wherever the plain run fits).
"""

import argparse
import json
from pathlib import Path

import torch

from lasp.bench.common import environment, write_jsonl
from lasp.cli import at_least, usage_error, writable
from lasp.distributed.events import cpu_profile
from lasp.model import chunked_lm_loss_sum, lm_loss_sum

MEASURED, FAKE = "measured", "fake-tensor tracked"


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def estimated_bytes(
    path: str, tokens: int, vocab: int, hidden: int, chunk_tokens: int, dtype: torch.dtype = torch.float32
) -> int:
    """What a real run of `path` ("plain" or "chunked") needs: inputs and gradients, plus its [n, V] buffers."""
    es = max(torch.finfo(dtype).bits // 8, 4)  # the loss computes in float32 or better
    inputs = 2 * (tokens + vocab) * hidden * torch.finfo(dtype).bits // 8 + 8 * tokens
    rows = 3 * tokens if path == "plain" else 2 * min(chunk_tokens or tokens, tokens)
    return inputs + rows * vocab * es


def peak_cpu_memory(fn) -> int:
    """Highest number of bytes torch had allocated on the CPU, above the starting point, while fn() ran."""
    with cpu_profile(profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


def fake_peak_memory(fn, *inputs: torch.Tensor) -> int:
    """Highest number of bytes of live tensor storage, above `inputs`, while fn() ran; for fake tensors."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(*inputs)  # else a view of an input (h[a:b], w.T) would count its whole storage
    base = sum(s["Total"] for s in mt.get_tracker_snapshot().values())
    with mt:
        fn()
    return sum(s["Total"] for s in mt.get_tracker_snapshot("peak").values()) - base


def _step(path: str, h, w, labels, chunk_tokens: int):
    def run():
        if path == "plain":
            loss = lm_loss_sum(h @ w.T, labels)
        else:
            loss = chunked_lm_loss_sum(h, w, labels, chunk_tokens=chunk_tokens)
        loss.backward()
        h.grad = w.grad = None

    return run


def _peak(path: str, method: str, tokens: int, vocab: int, hidden: int, chunk_tokens: int, dtype: torch.dtype) -> int:
    if method == MEASURED:
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(1, tokens, hidden, generator=gen).to(dtype).requires_grad_()
        w = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(dtype).requires_grad_()
        labels = torch.randint(0, vocab, (1, tokens), generator=gen)
        return peak_cpu_memory(_step(path, h, w, labels, chunk_tokens))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # no data: the step's values are never read, only its shapes and storages
        h = torch.empty(1, tokens, hidden, dtype=dtype).requires_grad_()
        w = torch.empty(vocab, hidden, dtype=dtype).requires_grad_()
        labels = torch.zeros(1, tokens, dtype=torch.long)
        return fake_peak_memory(_step(path, h, w, labels, chunk_tokens), h, w, labels)


def loss_peak_memory(
    tokens: int = 65536,
    vocab: int = 32768,
    hidden: int = 1024,
    chunk_tokens: int = 4096,
    dtype: torch.dtype = torch.float32,
    method: str = "auto",
) -> dict:
    """Peak CPU memory of one forward + backward of the loss over `tokens` tokens (hidden [1, tokens, hidden],
    weight [vocab, hidden], random labels), plain and chunked: {plain,chunked}_bytes, {plain,chunked}_peak_gib,
    {plain,chunked}_method ("measured" or "fake-tensor tracked"), ratio (chunked / plain), and the sizes.
    method: "measured", "fake", or "auto" (measured where the estimated need is under half of MemAvailable)."""
    if method not in ("auto", "measured", "fake"):
        raise ValueError(f"method must be auto, measured or fake, got {method!r}")
    avail = available_bytes()
    row = {
        "tokens": tokens,
        "vocab": vocab,
        "hidden": hidden,
        "chunk_tokens": chunk_tokens,
        "dtype": str(dtype),
        "mem_available_bytes": avail,
    }
    for path in ("chunked", "plain"):
        need = estimated_bytes(path, tokens, vocab, hidden, chunk_tokens, dtype)
        if method == "auto":
            how = MEASURED if avail is not None and need < avail / 2 else FAKE
        else:
            how = MEASURED if method == "measured" else FAKE
        peak = _peak(path, how, tokens, vocab, hidden, chunk_tokens, dtype)
        row |= {
            f"{path}_bytes": peak,
            f"{path}_peak_gib": peak / 2**30,
            f"{path}_method": how,
            f"{path}_estimated_need_bytes": need,
        }
    row["ratio"] = row["chunked_bytes"] / row["plain_bytes"]
    return row


def validate(
    tokens: int, vocab: int, hidden: int = 1024, chunk_tokens: int = 4096, dtype: torch.dtype = torch.float32
) -> dict:
    """Both methods at one size: the measured and fake-tensor figures and their relative differences."""
    real = loss_peak_memory(tokens, vocab, hidden, chunk_tokens, dtype, method="measured")
    fake = loss_peak_memory(tokens, vocab, hidden, chunk_tokens, dtype, method="fake")
    row = {k: real[k] for k in ("tokens", "vocab", "hidden", "chunk_tokens", "dtype")}
    for path in ("plain", "chunked"):
        m, f = real[f"{path}_bytes"], fake[f"{path}_bytes"]
        row |= {f"{path}_measured_bytes": m, f"{path}_fake_bytes": f, f"{path}_rel_diff": (f - m) / m}
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lasp.bench.loss_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument(
        "--method",
        choices=["auto", "measured", "fake"],
        default="auto",
        help="measured: real run and profiler; fake: fake tensors and MemTracker; auto: measured where it fits",
    )
    p.add_argument("--validate", action="store_true", help="run both methods and report how far apart they are")
    p.add_argument("--out", type=Path, default=None, help="write <out>.jsonl")
    a = p.parse_args(argv)
    problems = [q for option in ("tokens", "vocab", "hidden") for q in at_least(f"--{option}", getattr(a, option))]
    problems += at_least("--chunk-tokens", a.chunk_tokens, low=0)
    if a.out is not None:
        problems += writable("--out", a.out.with_suffix(".jsonl"))
    usage_error(p, problems)
    if a.validate:
        row = validate(a.tokens, a.vocab, a.hidden, a.chunk_tokens)
    else:
        row = loss_peak_memory(a.tokens, a.vocab, a.hidden, a.chunk_tokens, method=a.method)
    row = {**row, **environment()}
    print(json.dumps(row))
    if a.out is not None:
        write_jsonl(a.out.with_suffix(".jsonl"), [row])


if __name__ == "__main__":
    main()
