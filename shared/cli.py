"""The flags every step accepts. A step adds its own with `parser.add_argument` before `parse_args`.

Every value is checked when it is parsed: a bad one stops the run with `error: argument --flag: ...` (one line,
and a pointer to --help) and exit code 2, before any data is read or any model is built.
"""
import argparse
import atexit
import difflib
import itertools
import math
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

from shared.steps import ROOT, STEPS_DIR, all_steps


def checked(convert, ok, what: str):
    """An argparse type: convert the text, then check it, or say what was expected."""
    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


MAX_SEED = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38
positive_int = checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive, finite number")
even_positive_int = checked(int, lambda v: v > 0 and v % 2 == 0, "a positive, even integer")
# AdamW's first step scales by lr / (1 - beta1) = 10 x lr, a float32 scalar: past its largest, an overflow
learning_rate = checked(float, lambda v: 0 < v < FLOAT32_MAX / 10, "a positive number below 3.4e37")  # nan fails
probability = checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")  # nan and inf fail the test
seed = checked(int, lambda v: 0 <= v <= MAX_SEED, f"a seed from 0 to {MAX_SEED}")
new_tokens = checked(int, lambda v: 0 < v <= 10_000, "a positive integer up to 10,000")  # about 7,500 words
iterations = checked(int, lambda v: 0 < v <= 10**9, "a positive integer up to 1,000,000,000")  # years, at 0.1 s each


def out_dir(text: str) -> Path:
    """An argparse type: a directory we can write to, made now, so that a bad --out fails before any work. What it
    made goes again at exit if nothing was written there: a refused run leaves no empty directory behind."""
    path = Path(text)
    if not text.strip():  # Path("") is ".": the run would write into whatever directory it was started in
        raise argparse.ArgumentTypeError("expected a directory, got ''")
    not_the_projects_own(text)  # on every rank: it makes nothing
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone writes, and checks: another rank, stopped by
        return path  # torchrun when rank 0 refuses to run, would leave behind a directory it had made
    return writable_dir(text)


def writable_dir(text: str) -> Path:
    """The directory text names, made now (what it made goes at exit if it is still empty), with a file made in it
    and removed: one that cannot be written to is refused before any work."""
    path = Path(text)
    try:  # OSError: a name too long, too
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file, not a directory")
        # a link to nothing, the directory itself or one above it: mkdir would only say "File exists"
        if broken := next((d for d in (path, *path.parents) if d.is_symlink() and not d.exists()), None):
            raise argparse.ArgumentTypeError(f"{broken} is a link to {os.readlink(broken)}, which does not exist")
        made = [d for d in (path.absolute(), *path.absolute().parents) if not d.exists()]  # deepest first
        atexit.register(remove_if_empty, made)  # absolute: the directory the process ends in may be another
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write to {text} ({reason(e)})")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:  # /proc, say: there, but no file can be made in it
        raise argparse.ArgumentTypeError(f"cannot write to {text}: a file cannot be made in it ({reason(e)})")
    return path


SOURCES = ("steps", "diary", "tests", "shared", "docs", ".ci", ".git")  # the project's own directories
ROOT_FILES = ("README.md", "Makefile", "pyproject.toml", ".gitignore")
PICTURES = "diary/img"  # the diaries' pictures: make curves draws them there (diaries 14 and 17 say how)


def not_the_projects_own(text: str, picture: bool = False) -> None:
    """Refuses the project's root, its own directories and what is in them, and its own files in the root: what a
    command makes never overwrites the project. picture: a file right in diary/img is let through (make curves)."""
    if picture and Path(text).resolve().parent == (ROOT / PICTURES).resolve():  # exactly, case and all
        return
    path, root = (Path(str(p).casefold()) for p in (Path(text).resolve(), ROOT))  # a Mac's disk: Steps/ is steps/
    if path == root or any(path.is_relative_to(root / d.casefold()) for d in SOURCES) or (
            path.parent == root and path.name in {f.casefold() for f in ROOT_FILES}):
        raise argparse.ArgumentTypeError(f"{text} is the project's own: what a command makes goes elsewhere (runs/, "
                                         "data/ and book/ are for it)")


def remove_if_empty(dirs: list[Path]) -> None:
    """Remove each directory, deepest first, up to the first that holds something (rmdir removes only empty ones)."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def reason(e: OSError) -> str:
    """Why a file operation failed, in the words of its errno ("No space left on device"), without "[Errno 28]"."""
    return os.strerror(e.errno) if e.errno else str(e)


def make_args(words: list[str]) -> str:
    """ARGS=... that gives `words` back to the Makefile's `eval "set -- $$ARGS"` when the line is pasted into a
    terminal: each word quoted for the eval, and the whole in double quotes (ARGS="--out \\"runs/it's mine\\"")
    unless it holds a $, `, \\ or !, which a terminal acts on there."""
    def word(w: str) -> str:
        return f'"{w}"' if "'" in w and not set(w) & set('"$`\\!') else shlex.quote(w)
    value = " ".join(map(word, words))
    if set(value) & set('$`\\!'):
        return "ARGS='" + value.replace("'", "'\\''") + "'"
    return 'ARGS="' + value.replace('"', '\\"') + '"'


def nearest_multiple(n: int, unit: int) -> int:
    """The multiple of unit nearest n, unit at least: a total batch that the micro-batches divide."""
    return max(1, (2 * n + unit) // (2 * unit)) * unit  # halves round up: 1.5 units -> 2, 2.5 -> 3 (round() gives 2)


def plural(n: int, word: str) -> str:
    """1 shard, 2 shards, 1,000 shards."""
    return f"{n:,} {word}{'s' * (n != 1)}"


def size(n: int) -> str:
    """A number of bytes in the largest unit that leaves at least 1: 512 bytes, 32.0 KiB, 36.0 MiB, 1.5 GiB, 7.3 TiB."""
    power, unit = next(((p, u) for p, u in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")) if n >= 2**p),
                       (0, "bytes"))
    return f"{n / 2**power:,.1f} {unit}" if power else plural(n, "byte")


def one_line(e: BaseException, width: int = 200) -> str:
    """An exception for an error message: "RuntimeError: its first line", cut to width; its name alone when its
    message is empty."""
    first = str(e).partition("\n")[0][:width]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def out_file(text: str, example: str = "results.json", picture: bool = False) -> Path:
    """An argparse type: a file whose directory can be written to (made now). A default given as text is checked
    too (argparse converts a str default), so a missing runs/ is made before the work, not found after it.
    picture: see not_the_projects_own."""
    path = Path(text)
    if not text.strip():  # Path("") is "."
        raise argparse.ArgumentTypeError(f"expected a file name, got '' (e.g. {example})")
    if answered(path.is_dir, text):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name, e.g. {path / example}")
    not_the_projects_own(text, picture)
    writable_dir(str(path.parent))  # the root itself may hold a file of yours (make curves --out curves.svg)
    return path


def existing_dir(text: str) -> Path:
    """An argparse type: a directory that is there already (a typo must not make a new, empty one)."""
    path = Path(text)
    if answered(path.is_file, text):  # --resume runs/10_training/checkpoint.pt: the directory was meant
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory: give the directory that holds it, "
                                         f"{path.parent}")
    if not answered(path.is_dir, text):
        raise argparse.ArgumentTypeError(f"{text} is not a directory" if answered(path.exists, text) else
                                         f"{text} does not exist")
    return path


def answered(ask, text: str) -> bool:
    """ask(), a question about the path text, or one argparse line when the file system cannot answer it (a name
    too long, a directory that cannot be read)."""
    try:
        return ask()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text} ({reason(e)})")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a mistake gets its one `error:` line and where the help is, not the usage block, and a
    flag is spelled out (argparse would take --max-step for --max-steps: a typo that runs).
    hint: the command that shows the help as a learner runs it (default: prog --help)."""

    def __init__(self, *args, hint: str = "", **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.hint = hint or f"{self.prog} --help"
        self.given: set[str] = set()  # the --flags of the last parse: a default can be told from the same value given
        self.argv: list[str] = []  # the last parse's arguments

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        self.argv = args
        self.given = {a.split("=")[0] for a in args if a.startswith("--")}
        return super().parse_known_args(args, namespace)

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            message += self.unknown_flag(message.split(": ", 1)[1].split())
        self.exit(2, f"{self.prog}: error: {message}\n({self.hint} lists every flag)\n")

    def unknown_flag(self, unknown: list[str]) -> str:
        """For the first unknown --flag: the flag of this command it shortens, misspells or renames (step 08 takes
        GPT-2's names), and the steps that have it (a flag of another step). Nothing where none of these is near: a
        wrong guess misleads more than none. A word first, after a flag of text and its value: the rest of a value
        of several words, unquoted."""
        if unknown and not unknown[0].startswith("-") and unknown[0] in self.argv:
            i = self.argv.index(unknown[0])
            action = self._option_string_actions.get(self.argv[i - 2]) if i >= 2 else None
            if action and action.type in (None, str, out_dir, out_file, existing_dir) and not action.choices:
                # text or a path, which may have spaces
                value = " ".join(itertools.takewhile(lambda a: not a.startswith("-"), self.argv[i - 1:]))
                quoted = f'"{value}"' if "'" in value else f"'{value}'"
                return f" (a value of several words goes in quotes: {self.argv[i - 2]} {quoted})"
        flag = next((a.split("=")[0] for a in unknown if a.startswith("--")), None)
        if flag is None:
            return ""
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        near = [f for f in flags if f.startswith(flag) and f != "--help"] if len(flag) > 3 else []  # --warmup
        near = near or difflib.get_close_matches(flag.replace("_", "-"), flags, n=1, cutoff=0.85)  # --max-stpes, --d_ff
        said = [f"here it is {RENAMED[flag]}"] if RENAMED.get(flag) in flags else \
            [f"did you mean {' or '.join(near)}?"] if near else []
        if self.prog.startswith("python -m steps.") and (steps := steps_with_flag(flag)):
            said.append(f"{flag} is a flag of step{'s' * (len(steps) > 1)} {spans(steps)}")
        return f" ({'; '.join(said)})" if said else ""


# The 2017 Transformer's names for the sizes (steps 01-07) and GPT-2's (08 on), either way
RENAMED = {"--d-model": "--n-embd", "--n-heads": "--n-head", "--n-layers": "--n-layer"}
RENAMED |= {gpt2: paper for paper, gpt2 in RENAMED.items()}


def steps_with_flag(flag: str) -> list[str]:
    """The steps whose command adds `flag` (--no-cache: those that add --cache, whose --no- form it is), itself or
    through parser()."""
    names = {flag} | ({"--" + flag[len("--no-"):]} if flag.startswith("--no-") else set())
    common = names & {s for a in parser("", "01_x", 1)._actions for s in a.option_strings}  # --max-steps, --out, ...

    def adds(text: str) -> bool:
        return any(re.search(rf'add_argument\(\s*"{re.escape(n)}"', text) for n in names)

    return [s for s in all_steps() if adds(text := (STEPS_DIR / s / "__main__.py").read_text())
            or (common and "cli.parser(" in text)]


def spans(steps: list[str]) -> str:
    """['14_a', '15_b', '16_c', '18_d'] -> '14 to 16, 18': the numbers, runs of neighbours as one."""
    runs: list[list[int]] = []
    for n in sorted(int(s[:2]) for s in steps):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]:02d}" if len(r) == 1 else f"{r[0]:02d} {'and' if len(r) == 2 else 'to'} {r[-1]:02d}"
                     for r in runs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the step's docstring line for line (a command in it stays one line) and every default but None
    and a --flag/--no-flag's "auto": the help of such a flag says what happens without it."""

    def _get_help_string(self, action):  # the method ArgumentDefaultsHelpFormatter overrides to add "(default: ...)"
        unsaid = action.default is None or (isinstance(action, argparse.BooleanOptionalAction)
                                            and not isinstance(action.default, bool))  # "auto": not a value to type
        return action.help if unsaid else super()._get_help_string(action)


def parser(doc: str, step: str, max_steps: int) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=f"python -m steps.{step}", description=doc, formatter_class=HelpFormatter,
                       hint=f'make step N={step[:2]} ARGS="--help"')
    p.add_argument("--max-steps", type=iterations, default=max_steps, help="training iterations")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run; auto = cuda, else mps, else cpu")
    p.add_argument("--seed", type=seed, default=1337,
                   help="random seed: the same seed gives the same losses on the same machine and thread count")
    p.add_argument("--out", type=out_dir, default=str(Path("runs") / step),  # text: argparse checks it too
                   help="directory for metrics.jsonl, summary.json and loss.svg"
                   + (", checkpoint.pt and model/" if int(step[:2]) >= 10 else ""))  # steps 10 on save a model
    p.add_argument("--log-every", type=non_negative_int, default=0,
                   help="print every n-th iteration, 0 = about 25 lines a run, and one after a minute without; "
                   "metrics.jsonl keeps every iteration")
    return p


def parse_with_preset(p: argparse.ArgumentParser, argv, presets: dict[str, dict], pick) -> argparse.Namespace:
    """Parse twice: first to learn the preset (--preset, or pick(args) when it is auto), then with that preset's
    values as the defaults, so that a flag given on the command line overrides its preset's value and --help
    shows the values in force. args.preset is the name of the preset used."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first, _ = p.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    name = pick(first) if first.preset == "auto" else first.preset
    p.set_defaults(**presets[name])
    args = p.parse_args(argv)
    args.preset = name
    return args
