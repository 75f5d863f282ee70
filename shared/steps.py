"""The step registry, standard library only (the Makefile runs it before any install).

    python3 -m shared.steps list          each step and its one-line lesson
    python3 -m shared.steps resolve 7     -> 07_decoder_only (also 07, 07_decoder_only)
    python3 -m shared.steps prev 08_gpt2  -> 07_decoder_only
    python3 -m shared.steps brought 17    the shared/ code step 17 is the first to import (make diff says so)
    python3 -m shared.steps deps [NAME]   the pinned dependencies from pyproject.toml (or only those named)
"""
import ast
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS_DIR = ROOT / "steps"


def all_steps() -> list[str]:
    """Step directory names in order: ['01_embedding', '02_attention', ...]."""
    return sorted(p.name for p in STEPS_DIR.iterdir() if p.is_dir() and re.fullmatch(r"\d\d_\w+", p.name))


def lesson(step: str) -> str:
    """First line of the step's package docstring."""
    doc = ast.get_docstring(ast.parse((STEPS_DIR / step / "__init__.py").read_text())) or ""
    return doc.splitlines()[0] if doc else ""


def resolve(n: str) -> str:
    """'7', '07' or '07_decoder_only' -> '07_decoder_only'; anything else raises ValueError."""
    n = n.strip()
    for step in all_steps():
        if n == step or (n.isascii() and n.isdigit() and int(n) == int(step[:2])):  # not '²', not '٨'
            return step
    raise ValueError(f"unknown step {n!r}" if n else "no step given (use N=08)")


def shared_imports(step: str) -> set[str]:
    """The shared/ modules the step's files import (`from shared import a, b` or `from shared.a import ...`)."""
    names = set()
    for path in (STEPS_DIR / step).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "shared":
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shared."):
                names.add(node.module.split(".")[1])
    return names


def shared_brought(step: str) -> list[str]:
    """The shared/ files the step is the first to import: part of what it adds that `diff -ru` of the steps does not
    show (step 17's shards.py, the pipeline of make data)."""
    earlier = set().union(*(shared_imports(s) for s in all_steps()[: all_steps().index(step)]))
    return sorted(f"{name}.py" for name in shared_imports(step) - earlier)


def listing() -> str:
    return "\n".join(f"  {s[:2]}  {s:<20} {lesson(s)}" for s in all_steps())


def bad_args(args: str) -> str:
    """What make says when the shell cannot read ARGS: a quote left open, or a character the shell acts on."""
    try:
        shlex.split(args)
    except ValueError:  # "No closing quotation"
        if "'" not in args:
            return f"error: ARGS has a quote that is not closed: {args}"
        return (f"error: ARGS has a quote that is not closed: {args}\n"
                r'''An apostrophe ends a value quoted with '...': quote such a value with \"...\", '''
                r'''as in ARGS="--prompt \"I'm here\""''')
    return (f"error: the shell cannot read ARGS: {args}\n"
            '''A value with ( ) ; & | < or > in it goes in quotes, as in ARGS="--prompt 'Hi :)'"''')


def main(argv: list[str]) -> int:
    cmd, *rest = argv or ["list"]
    if cmd == "list":
        print(listing())
    elif cmd == "deps":  # all of them, or those named: deps torch
        deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        print(" ".join(d for d in deps if not rest or re.split(r"[=<>~ ]", d)[0] in rest))
    elif cmd == "brought" and rest:  # after make diff: what the diff of the step directories leaves out
        try:
            step = resolve(rest[0])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if files := shared_brought(step):
            print(f"\nnot in this diff: step {step[:2]} is the first to import "
                  + ", ".join(f"shared/{f}" for f in files) + f"; read {'it' if len(files) == 1 else 'them'} whole "
                  f"(make book shows {'it' if len(files) == 1 else 'them'} on the step's page)")
    elif cmd == "bad-args":  # make, when the shell cannot read ARGS
        print(bad_args(os.environ.get("ARGS", "")), file=sys.stderr)
        return 2
    elif cmd in ("resolve", "prev"):
        try:
            step = resolve(rest[0] if rest else "")
        except ValueError as e:
            print(f"error: {e}. The steps are:\n{listing()}", file=sys.stderr)
            return 2
        if cmd == "prev":
            i = all_steps().index(step)
            if i == 0:
                files = ", ".join(f"shared/{f}" for f in shared_brought(step))
                print(f"error: {step} is the first step: there is no step before it to diff against. Read "
                      f"steps/{step} whole, and the modules of shared/ it imports: {files} (make book shows them on "
                      "the step's page)", file=sys.stderr)
                return 2
            step = all_steps()[i - 1]
        print(step)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
        sys.stdout.flush()  # here, where a reader gone (make list | head) is caught, not at exit
    except BrokenPipeError:  # the reader has what it wanted: stop as quietly as it did
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush has nowhere to fail
        code = 0
    sys.exit(code)
