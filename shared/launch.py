"""make step N=16 NPROC=4: torchrun, with its own messages kept short.

    python -m shared.launch 4 steps.16_ddp --max-steps 20     is    torchrun --standalone --nproc-per-node=4 -m ...

A failed run ends with the failing rank's own message (rank 0 speaks for all) and one line from here, instead of
torchrun's report (a traceback of the launcher itself); Ctrl-C ends with rank 0's resume command. Each process gets
an equal share of the cores.
"""
import logging
import os
import signal
import sys
import tempfile

from shared import cli

# What one process of the tiny preset holds on a CPU at its peak: torch, its model and AdamW, gloo (689 MB, diary 16)
PROCESS_BYTES = 700 * 2**20


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdecimal() or int(argv[0]) < 1:
        sys.exit("error: python -m shared.launch NPROC MODULE [FLAGS ...], NPROC a whole number of processes >= 1")
    nproc, module, *flags = argv
    import torch

    from shared import device

    free = device.free_memory(torch.device("cpu"))
    if free is not None and int(nproc) > 1 and int(nproc) * PROCESS_BYTES > free:  # past it, the kernel kills them
        sys.exit(f"error: NPROC={nproc}: each process holds a torch and a model of its own, about "
                 f"{cli.size(PROCESS_BYTES)} of memory at the smallest; {nproc} would need "
                 f"{cli.size(int(nproc) * PROCESS_BYTES)}, and this machine has {cli.size(free)} free "
                 f"(NPROC={max(1, free // PROCESS_BYTES)} at most)")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(nproc))))  # no oversubscribing
    os.environ.setdefault("LOGLEVEL", "ERROR")  # torchrun's agent: no warning when Ctrl-C reaches it
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # torchrun's own log, its report among it
    try:
        # its ranks' error files go here, and go with it (torchrun's own /tmp/torchelastic_* would stay)
        with tempfile.TemporaryDirectory(prefix="torchrun-") as logs:
            run.main(["--standalone", f"--nproc-per-node={nproc}", f"--log-dir={logs}", "-m", module, *flags])
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == 130:  # Ctrl-C: every rank stopped at the same iteration; rank 0 has said how to go on
            return 130
        if failure.exitcode < 0:  # killed by a signal, before it could say why
            name = next((s.name for s in signal.Signals if s == -failure.exitcode), f"signal {-failure.exitcode}")
            print(f"torchrun: rank {rank} was killed ({name}"
                  + (", most likely by the kernel for want of memory: fewer processes (NPROC) or a smaller model"
                     if name == "SIGKILL" else "") + "); the others were stopped", file=sys.stderr)
            return 1
        print(f"torchrun: rank {rank} exited with {failure.exitcode}; the others were stopped", file=sys.stderr)
        return failure.exitcode
    except (SignalException, KeyboardInterrupt):  # Ctrl-C: torchrun passed it on; rank 0 has said how to go on
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
