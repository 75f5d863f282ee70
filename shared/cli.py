"""The flags every step accepts. A step adds its own with `parser.add_argument` before `parse`."""
import argparse
import sys
from pathlib import Path


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = 0.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def probability(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {s!r}")
    return v


def parser(doc: str, step: str, max_steps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m steps.{step}", description=doc,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--max-steps", type=positive_int, default=max_steps, help="training iterations")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    p.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same losses on the CPU)")
    p.add_argument("--out", type=Path, default=Path("runs") / step, help="where metrics.jsonl and loss.svg go")
    return p
