"""Pick the device: auto = cuda, else mps, else cpu. An unavailable choice exits with a message.
Also: whether the device computes in bf16 natively, which decides what `--dtype auto` means, and running out of
its memory as one line instead of a traceback."""
import contextlib
import dataclasses
import functools
import os
import re
import sys
from pathlib import Path

import torch

from shared import cli


def pick(name: str = "auto") -> torch.device:
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if available[d])
    if not available.get(name, False):
        sys.exit(f"error: --device {name} is not available on this machine (available: "
                 f"{', '.join(d for d, ok in available.items() if ok)})")
    return torch.device(name)


def cpu_flags() -> set[str]:
    """The CPU's feature flags, as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def bf16_native(device: torch.device) -> tuple[bool, str]:
    """Does this device run bf16 matmuls in hardware? And why, in words for the log."""
    if device.type == "cuda":  # not torch.cuda.is_bf16_supported(): it also says yes where bf16 is only emulated
        name, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        if major >= 8:  # Ampere (A100, RTX 30xx) and later have bf16 tensor cores
            return True, f"{name} (compute capability {major}.{minor}) computes in bf16"
        return False, (f"{name} (compute capability {major}.{minor}) has no bf16 tensor cores: bf16 would be "
                       f"emulated, and slower than fp32 (native bf16 needs 8.0, Ampere, or newer)")
    if device.type == "cpu":
        if found := sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"}):
            return True, f"this CPU has {' and '.join(found)}"
        return False, "this CPU has neither avx512_bf16 nor amx_bf16: bf16 would be emulated, and slower than fp32"
    return False, f"bf16 autocast is not chosen automatically on {device.type}"


def free_memory(device: torch.device) -> int | None:
    """Bytes the device has free now: CUDA's count, or on a CPU Linux's MemAvailable; None where neither says."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        with contextlib.suppress(OSError, IndexError, ValueError):
            return int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024  # kB
    return None


def refuse_a_model_too_big(build, config, device: torch.device) -> None:
    """Before the model is built: stop in one line when its weights, gradients and AdamW's two moments (4 x 4 bytes a
    parameter) need more memory than the device has free (an --n-layer of 100000 would build for minutes first).
    The count: build(config) on the meta device (shapes, no memory) with 1 and with 2 layers."""
    with torch.device("meta"):
        one, two = (sum(p.numel() for p in build(dataclasses.replace(config, n_layer=k)).parameters()) for k in (1, 2))
    n = one + (config.n_layer - 1) * (two - one)
    if device.type == "cpu" and os.environ.get("LOCAL_RANK", "0") != "0":  # one process decides for the machine:
        return  # each would read the free memory at another moment, as the others fill it, and might decide otherwise
    free = free_memory(device)
    share = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1  # torchrun's processes here
    if free is not None and 16 * n * share > free:
        sys.exit(f"error: a model of {n:,} parameters ({config.n_layer:,} layers of {config.n_embd:,}) needs "
                 f"{cli.size(16 * n)} for its weights, gradients and AdamW's moments alone"
                 + (f", {cli.size(16 * n * share)} for the {share} processes of NPROC={share}" if share > 1 else "")
                 + f"; the {device.type} has {cli.size(free)} free. Make it smaller (--n-layer, --n-embd)")


# torch 2.13's words for a size or count past 2**63 - 1: a flag of 10**19, or a product of flags past it
TOO_BIG_TO_COUNT = r"Storage size calculation overflowed|Overflow when unpacking long|int too big to convert"


def explain_out_of_memory(main):
    """main, with torch running out of memory (the CPU's allocator, CUDA or MPS) said in one line, exit 1; and a
    size that does not fit in 64 bits likewise."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (RuntimeError, TypeError, ValueError, OverflowError) as e:
            if re.search(TOO_BIG_TO_COUNT, str(e)):
                sys.exit("error: a size or count of 2**63 or more, past what torch holds in 64 bits (a tensor that "
                         "big, 8 EiB or more, fits no memory). Make the run smaller: a smaller --batch-size, a "
                         "shorter window or a smaller model")
            if not (isinstance(e, torch.OutOfMemoryError) or re.search(r"can't allocate memory|out of memory", str(e))):
                raise
            size = re.search(r"tried to allocate ([\d.]+) ?(bytes|[KMGT]i?B)", str(e), re.IGNORECASE)  # torch's words
            if size and size[2] == "bytes":  # the CPU's allocator counts bytes; CUDA and MPS say MiB, GiB, GB
                what = f"a tensor of {cli.size(int(size[1]))}"
            else:
                what = f"a tensor of {size[1]} {size[2]}" if size else "a tensor"
            sys.exit(f"error: out of memory: {what} did not fit. Make the run smaller: a smaller --batch-size, a "
                     "shorter window or a smaller model")
    return run
