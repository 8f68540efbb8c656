"""Process-group start-up: the one place the trainer reads the launcher's environment.

torchrun and the deepspeed launcher both export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; a plain `python` process has none of them and runs as a world of one.
"""

import datetime
import errno
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Launch:
    """Where this process sits, as the launcher said."""

    rank: int
    world_size: int
    local_rank: int
    launched: bool
    """True under torchrun / deepspeed (RANK and WORLD_SIZE set), False for a plain python process."""


def launch_env() -> Launch:
    """The launcher's variables (a world of one when there are none)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return Launch(rank, world, int(os.environ.get("LOCAL_RANK", rank)), True)
    return Launch(0, 1, 0, False)


def pick_device(want: str, launch: Launch) -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK) when CUDA is there, else the CPU. `cuda` without a GPU
    is an error."""
    has_cuda = torch.cuda.is_available()
    if want == "cuda" and not has_cuda:
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is visible (use train.device=cpu or auto)")
    if want == "cpu" or not has_cuda:
        return torch.device("cpu")
    if launch.local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {launch.local_rank} but only {torch.cuda.device_count()} GPUs are visible")
    torch.cuda.set_device(launch.local_rank)
    return torch.device("cuda", launch.local_rank)


def init_distributed(launch: Launch, device: torch.device, timeout_s: int) -> None:
    """NCCL on GPUs, gloo on CPU; every collective times out after `timeout_s` seconds."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    device_id = device if device.type == "cuda" else None
    if launch.launched and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(
            backend,
            store=_attempt_store(timeout),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
            device_id=device_id,
        )
    elif launch.launched:
        try:
            dist.init_process_group(backend, timeout=timeout, device_id=device_id)
        except dist.DistNetworkError as e:  # rank 0 listens on MASTER_PORT here (the deepspeed launcher's workers)
            if "EADDRINUSE" not in str(e):
                raise
            from lasp.train.config import ConfigError

            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            raise ConfigError("the launch", [in_use(host, port, "--master_port")]) from e
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def in_use(host: str, port: int, option: str) -> str:
    """The one line that says `port` is taken and what to do."""
    return f"port {port} on {host} is in use (by another run?): pass another {option} / MASTER_PORT"


def port_problem(host: str, port: int, option: str) -> str | None:
    """Why this process could not listen on `port` (the launcher's rendezvous store, or rank 0's), None when
    it could. torch's store listens on every interface with SO_REUSEADDR, and the port is tried the same way,
    so the answer is torch's (a listener anywhere, or a connection of that port still closing, takes it)."""
    if not 0 < port < 65536:
        return f"port {port} is not a port (1-65535): pass another {option} / MASTER_PORT"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return in_use(host, port, option)
            return f"port {port} on {host} cannot be listened on ({e.strerror}): pass another {option} / MASTER_PORT"
    return None


def _attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, with keys private to this restart attempt. After `--max-restarts` restarts the
    workers, the agent's store still holds the previous attempt's keys, and a process group created again
    under the same name can read the dead workers' addresses (gloo then fails with "Connection refused";
    seen with torch 2.13 when the mesh has groups of one rank). torch prefixes nothing per attempt there."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"lasp/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown(clean: bool) -> None:
    """Destroy the process group (a rank that exits without it may abort at shutdown). After an error
    there is no barrier: the other ranks may be waiting in another collective, and this process must exit
    so that the launcher tears the job down instead of every rank waiting for the collective timeout."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
