"""The flags every step accepts. A step adds its own with `parser.add_argument` before `parse`."""
import argparse
from pathlib import Path


def checked(convert, ok, what: str):
    """An argparse type: convert the text, then check it, or say what was expected."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive integer")
positive_float = checked(float, lambda v: v > 0, "a positive number")
probability = checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")


def parser(doc: str, step: str, max_steps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m steps.{step}", description=doc,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--max-steps", type=positive_int, default=max_steps, help="training iterations")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    p.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same losses on the CPU)")
    p.add_argument("--out", type=Path, default=Path("runs") / step, help="where metrics.jsonl and loss.svg go")
    return p
