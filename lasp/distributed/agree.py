"""Rank agreement: ranks that call a collective with different arguments get one named error, on every
rank at once, instead of a silently wrong result or a hang.

A checked message starts with a fixed-size header (HEADER_BYTES): the op's name, which call of it this
is, and its fingerprint, a list of named fields (local length, shapes, dtype, layout, ...). After the
collective every rank reads every rank's header and raises `RanksDisagree`, naming each field that
differs and every rank's value. The header travels inside the buffer the op gathers anyway
(`start_checked_gather`), or alone for ops whose own collectives carry no such buffer (`agree`).

Sizes. Backends do not report a collective whose ranks send different byte counts: gloo aborts the
process that receives too much and hands the other one garbage; NCCL hangs or reads garbage. So the
size must be agreed before a message is sent. Each (group, op) remembers the size of its last message,
which every rank agreed on. A call of that size sends its data at once: no extra collective. A call of
another size first sends an announcement (its header and its new size), padded to the remembered size
so that it matches whatever the other ranks send, and sends its data once every rank agrees. A rank
whose own arguments are wrong sends a refusal the same way (`refuse`), so its peers stop too. After a
disagreement every rank forgets the size, and the next call announces again.

Ranks must call the same ops in the same order (the same model on every rank): a header compares the
arguments of one call, it cannot line up two different sequences of calls.
"""

import struct
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lasp.distributed.comm import all_gather_async, group_size, note_collective

HEADER_SLOTS = 64
HEADER_BYTES = HEADER_SLOTS * 8
_MAGIC = int.from_bytes(b"LASPhdr1", "little")
_DATA, _ANNOUNCE, _REFUSE = 1, 2, 3
_FIXED = 6  # magic, kind, size, call, op name (2 slots)
_PER_FIELD = 3  # tag, 2 value slots
MAX_FIELDS = (HEADER_SLOTS - _FIXED) // _PER_FIELD
_NONE, _BOOL, _INT, _FLOAT, _STR = range(1, 6)

Value = bool | int | float | str | Tensor | None
"""A field's value. A one-element tensor on a GPU (a digest computed there) is written into the header on
the device, so building a header never waits for the GPU; it compares as the float or bool it holds."""


class RanksDisagree(ValueError):
    """The ranks of a group called the same collective with different arguments."""


@dataclass(frozen=True)
class Fingerprint:
    """What one call computes, as every rank must see it."""

    op: str
    """The op's name (at most 16 ASCII characters), e.g. "lasp2"."""
    fields: tuple[tuple[str, Value], ...] = ()
    """(name, value) pairs, at most MAX_FIELDS; the names are the words of the error message."""

    def __post_init__(self):
        if len(self.fields) > MAX_FIELDS:
            raise ValueError(f"a fingerprint holds at most {MAX_FIELDS} fields, got {len(self.fields)}")
        _str_slots(self.op)


@dataclass
class _OpState:
    size: int | None = None
    """Bytes of this op's last message on this group, agreed by every rank; None: announce first."""
    calls: int = 0


_states: "weakref.WeakKeyDictionary[dist.ProcessGroup, dict[str, _OpState]]" = weakref.WeakKeyDictionary()


def _state(group, op: str) -> _OpState:
    pg = group if group is not None else dist.group.WORLD
    return _states.setdefault(pg, {}).setdefault(op, _OpState())


# -- encoding ---------------------------------------------------------------------------------------------
def _str_slots(s: str) -> list[int]:
    raw = s.encode("ascii")
    if len(raw) > 16:
        raise ValueError(f"{s!r} is longer than the 16 bytes a header field holds")
    raw = raw.ljust(16, b"\0")
    return [int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:], "little", signed=True)]


def _slots_str(a: int, b: int) -> str:
    return (
        (a.to_bytes(8, "little", signed=True) + b.to_bytes(8, "little", signed=True))
        .rstrip(b"\0")
        .decode("ascii", "replace")
    )


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(i: int) -> float:
    return struct.unpack("<d", struct.pack("<q", i))[0]


def _encode_value(v: Value) -> list[int]:
    if v is None:
        return [_NONE, 0, 0]
    if isinstance(v, bool):
        return [_BOOL, int(v), 0]
    if isinstance(v, int):
        return [_INT, v, 0]
    if isinstance(v, float):
        return [_FLOAT, _float_bits(v), 0]
    if isinstance(v, str):
        return [_STR, *_str_slots(v)]
    raise TypeError(f"a fingerprint field is a bool, int, float, str, 0-dim tensor or None, got {type(v).__name__}")


def _show(tag: int, a: int, b: int) -> str:
    if tag == _NONE:
        return "none"
    if tag == _BOOL:
        return str(bool(a))
    if tag == _INT:
        return str(a)
    if tag == _FLOAT:
        return repr(_bits_float(a))
    if tag == _STR:
        return _slots_str(a, b)
    return f"<tag {tag}>"


def _encode(fp: Fingerprint, kind: int, size: int, call: int, device: torch.device) -> Tensor:
    """The header as int64 [HEADER_SLOTS] on `device`; device-valued fields are written there."""
    slots = [0] * HEADER_SLOTS
    slots[:_FIXED] = [_MAGIC, kind, size, call, *_str_slots(fp.op)]
    on_device = []
    for i, (_, value) in enumerate(fp.fields):
        base = _FIXED + _PER_FIELD * i
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"a tensor fingerprint field must hold one value, got shape {tuple(value.shape)}")
            is_bool = value.dtype == torch.bool
            if value.device.type == "cpu":  # no device to wait for
                value = bool(value) if is_bool else float(value)
            else:
                slots[base] = _BOOL if is_bool else _FLOAT
                on_device.append((base + 1, value, is_bool))
                continue
        slots[base : base + _PER_FIELD] = _encode_value(value)
    header = torch.tensor(slots, dtype=torch.int64, device=device)
    for slot, value, is_bool in on_device:
        v = value.detach().reshape(1).to(device)
        header[slot : slot + 1] = v.to(torch.int64) if is_bool else v.to(torch.float64).view(torch.int64)
    return header


# -- checking ---------------------------------------------------------------------------------------------
def _by_rank(values: list[str]) -> str:
    return ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))


def _check(headers: list[list[int]], fp: Fingerprint) -> None:
    """Raise RanksDisagree unless every rank's header describes the same call as this rank's."""
    if any(h[0] != _MAGIC for h in headers):
        odd = [r for r, h in enumerate(headers) if h[0] != _MAGIC]
        raise RanksDisagree(
            f"{fp.op}: rank(s) {odd} sent something other than a {fp.op} message: the ranks are not running "
            "the same collective here (do they run the same model and ops in the same order?)"
        )
    refused = [r for r, h in enumerate(headers) if h[1] == _REFUSE]
    if refused:
        raise RanksDisagree(
            f"{fp.op}: rank(s) {refused} refused their arguments (the error on those ranks says why); "
            "every rank of the group stops here"
        )
    ops = [_slots_str(h[4], h[5]) for h in headers]
    if len(set(ops)) > 1:
        raise RanksDisagree(f"ranks disagree on the operation: {_by_rank(ops)}")
    problems = []
    for i, (name, _) in enumerate(fp.fields):
        base = _FIXED + _PER_FIELD * i
        values = [tuple(h[base : base + _PER_FIELD]) for h in headers]
        if len(set(values)) > 1:
            problems.append(f"ranks disagree on {name}: {_by_rank([_show(*v) for v in values])}")
    if len({h[3] for h in headers}) > 1:
        problems.append(
            f"ranks disagree on the call number of {fp.op} on this group: {_by_rank([str(h[3]) for h in headers])} "
            "(one rank skipped a call, or a backward: does every rank's loss depend on every layer's output?)"
        )
    if not problems and len({h[2] for h in headers}) > 1:
        problems.append(f"ranks disagree on the message size in bytes: {_by_rank([str(h[2]) for h in headers])}")
    if problems:
        raise RanksDisagree(f"{fp.op}: " + "\n".join(problems))


def _headers(rows_WS: Tensor) -> list[list[int]]:
    return rows_WS[:, :HEADER_BYTES].contiguous().view(torch.int64).tolist()


def _exchange(fp: Fingerprint, kind: int, size: int, call: int, pad_to: int, group, device: torch.device) -> None:
    """A blocking all-gather of this rank's header, padded to `pad_to` bytes; raise on any disagreement."""
    buf = torch.zeros(pad_to, dtype=torch.uint8, device=device)
    buf[:HEADER_BYTES] = _encode(fp, kind, size, call, device).view(torch.uint8)
    out, pending = all_gather_async(buf, group)
    note_collective(f"{fp.op} fingerprint all-gather (call {call}) over {group_size(group)} ranks")
    pending.wait()
    if kind != _REFUSE:  # a refusing rank raises its own error
        _check(_headers(out.view(group_size(group), pad_to)), fp)


def _forget_on_error(state: _OpState, fn, *args) -> None:
    try:
        fn(*args)
    except RanksDisagree:
        state.size = None
        raise


# -- the API ----------------------------------------------------------------------------------------------
def agree(fp: Fingerprint, group, device: torch.device) -> None:
    """One small all-gather of fingerprints; raises RanksDisagree on every rank unless all ranks agree.
    For ops whose own collectives carry no buffer to hold the header (point-to-point, all-to-all)."""
    st = _state(group, fp.op)
    call, st.calls = st.calls, st.calls + 1
    _exchange(fp, _ANNOUNCE, HEADER_BYTES, call, HEADER_BYTES, group, device)


def refuse(fp: Fingerprint, group, device: torch.device) -> None:
    """Tell the other ranks of `group` that this rank's arguments to `fp.op` are wrong, in the message
    they expect, so that they raise too instead of waiting. The caller then raises its own error."""
    st = _state(group, fp.op)
    pad_to = st.size or HEADER_BYTES
    st.calls, st.size = st.calls + 1, None
    _exchange(fp, _REFUSE, pad_to, st.calls - 1, pad_to, group, device)


class CheckedGather:
    """An all-gather in flight whose message carries a header; `wait()` checks every rank's header."""

    def __init__(self, out: Tensor, pending, fp: Fingerprint, like: Tensor, state: _OpState | None, W: int):
        self._out, self._pending, self._fp, self._like, self._state, self._W = out, pending, fp, like, state, W

    def wait(self) -> Tensor:
        """Every rank's x stacked in rank order, [W, *x.shape], once every header agrees."""
        self._pending.wait()
        rows = self._out.view(self._W, -1)
        if self._state is None:
            _check(_headers(rows), self._fp)
        else:
            _forget_on_error(self._state, _check, _headers(rows), self._fp)
        return rows[:, HEADER_BYTES:].view(self._like.dtype).unflatten(1, tuple(self._like.shape))


def start_checked_gather(x: Tensor, group, fp: Fingerprint, *, call: int | None = None) -> tuple[CheckedGather, int]:
    """Start gathering x from every rank, with fp's header in the same message. Returns the gather and
    the call number. With `call` None this is a new call of fp.op (announced first when its size differs
    from the last one's); with a number it belongs to that call (a backward: its size is already agreed)."""
    payload = x.contiguous().reshape(-1).view(torch.uint8)
    size = HEADER_BYTES + payload.numel()
    state = None
    if call is None:
        state = _state(group, fp.op)
        call, state.calls = state.calls, state.calls + 1
        if state.size != size:
            _forget_on_error(state, _exchange, fp, _ANNOUNCE, size, call, state.size or HEADER_BYTES, group, x.device)
            state.size = size
    header = _encode(fp, _DATA, size, call, x.device)
    out, pending = all_gather_async(torch.cat([header.view(torch.uint8), payload]), group)
    note_collective(f"{fp.op} all-gather of {tuple(x.shape)} (call {call}) over {group_size(group)} ranks")
    return CheckedGather(out, pending, fp, x, state, group_size(group)), call
