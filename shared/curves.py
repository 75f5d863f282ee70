"""make curves: the loss curves of several runs in one picture, to see what a step's lesson changed.

    make step N=13 ARGS="--eval-every 25"; make step N=14 ARGS="--eval-every 25"
    make curves ARGS="runs/13_vocab_50304 runs/14_gpt3_hparams"        draws runs/curves.svg

Each run is drawn in a colour of its own: its training loss thin and faint (one batch an iteration: noisy), its
validation loss thick (the whole split each time). Runs compare when they train on the same batches from the same
start: the same sizes (the loader's batches) and the same --seed (the initial weights).
"""
import argparse
import sys
from pathlib import Path

from shared import cli, runlog
from shared.steps import all_steps

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def run_dir(text: str) -> Path:
    """An argparse type: a directory that holds a metrics.jsonl (what make step writes to its --out)."""
    if (step := Path(text).name) in all_steps() and not Path(text).exists():  # runs/13_vocab_50304 on a fresh clone
        raise argparse.ArgumentTypeError(f"{text} does not exist (make step N={step[:2]} writes runs/{step})")
    path = cli.existing_dir(text)
    if not (path / "metrics.jsonl").is_file():
        raise argparse.ArgumentTypeError(f"{text} holds no metrics.jsonl: give the --out of a make step run "
                                         "(runs/NN_name by default)")
    return path


def svg_file(text: str) -> Path:
    """An argparse type: a new picture's name, .svg, not a run's own loss curve (loss.svg beside a metrics.jsonl);
    in the project, only a diary's picture (diary/img/NAME.svg)."""
    path = cli.out_file(text, example="curves.svg", picture=True)
    if path.suffix.lower() != ".svg":
        raise argparse.ArgumentTypeError(f"{text} is not named .svg: the picture is an SVG (e.g. runs/curves.svg)")
    if path.name == "loss.svg" and (path.parent / "metrics.jsonl").exists():
        raise argparse.ArgumentTypeError(f"{text} is the loss curve make step drew for the run beside it: give "
                                         "another name")
    return path


def labels(dirs: list[Path]) -> list[str]:
    """Each run's name in the legend: its directory's name, or the whole path where two names are the same."""
    names = [d.resolve().name for d in dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, dirs)]


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="make curves", description=__doc__.split(": ", 1)[1], hint='make curves ARGS="--help"',
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=run_dir, metavar="DIR", help="a run's directory (the --out of make step)")
    p.add_argument("--out", type=svg_file, default="runs/curves.svg", metavar="FILE", help="the picture (default: "
                   "runs/curves.svg)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if len(args.runs) > len(PALETTE):
        p.error(f"{len(args.runs)} runs: {len(PALETTE)} at most, one colour each")
    seen = {}
    for d in args.runs:
        if d.resolve() in seen:
            p.error(f"{d} is named twice (as {seen[d.resolve()]} before)")
        seen[d.resolve()] = d
    train, validation, colours, ended = {}, {}, {}, {}
    for label, d, colour in zip(labels(args.runs), args.runs, PALETTE):
        try:
            rows, notes = runlog.metrics_rows(d / "metrics.jsonl")
        except OSError as e:
            p.error(f"cannot read {d / 'metrics.jsonl'} ({cli.reason(e)})")
        for note in notes:
            print(f"note: {d / 'metrics.jsonl'}: {note}", file=sys.stderr)
        for curves, part, key in ((train, "train", "loss"), (validation, "validation", "val_loss")):
            if points := [(r["iter"], r[key]) for r in rows if r.get(key) is not None]:
                curves[f"{label} {part}"], colours[f"{label} {part}"] = points, colour
                ended[label] = part, *points[-1]  # the validation loss's where there is one: a batch's is noisy
        if label not in ended:
            p.error(f"{d / 'metrics.jsonl'} has no loss to draw")
    runlog.write_or_stop(args.out, runlog.loss_svg(train | validation, colours=colours))  # validation on top
    for label, (part, it, loss) in ended.items():
        print(f"{label}: {part} loss {loss:.4f} at iteration {it}")
    print(f"curves: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
