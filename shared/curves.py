"""make curves: the loss curves of several runs in one picture, to see what a step's lesson changed.

    make step N=13 ARGS="--eval-every 25"; make step N=14 ARGS="--eval-every 25"
    make curves ARGS="runs/13_vocab_50304 runs/14_gpt3_hparams"        draws runs/curves.svg

Each run is drawn in a colour of its own: its training loss thin (one batch an iteration: noisy), its validation
loss thick (the whole split each time). Runs compare when they saw the same batches: the same step sizes and --seed.
"""
import argparse
import sys
from pathlib import Path

from shared import cli, runlog

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def run_dir(text: str) -> Path:
    """An argparse type: a directory that holds a metrics.jsonl (what make step writes to its --out)."""
    path = cli.existing_dir(text)
    if not (path / "metrics.jsonl").is_file():
        raise argparse.ArgumentTypeError(f"{text} holds no metrics.jsonl: give the --out of a make step run "
                                         "(runs/NN_name by default)")
    return path


def labels(dirs: list[Path]) -> list[str]:
    """Each run's name in the legend: its directory's name, or the whole path where two names are the same."""
    names = [d.name for d in dirs]
    return [d.name if names.count(d.name) == 1 else str(d) for d in dirs]


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="make curves", description=__doc__.split("\n\n")[0], hint='make curves ARGS="--help"')
    p.add_argument("runs", nargs="+", type=run_dir, help="the runs' directories (each a --out of make step)")
    p.add_argument("--out", type=cli.out_file, default="runs/curves.svg", help="the picture (default: runs/curves.svg)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if len(args.runs) > len(PALETTE):
        p.error(f"{len(args.runs)} runs: {len(PALETTE)} at most, one colour each")
    if len(set(d.resolve() for d in args.runs)) < len(args.runs):
        p.error("a run is named twice")
    curves, colours = {}, {}
    for label, d, colour in zip(labels(args.runs), args.runs, PALETTE):
        rows, notes = runlog.metrics_rows(d / "metrics.jsonl")
        for note in notes:
            print(f"note: {d / 'metrics.jsonl'}: {note}", file=sys.stderr)
        for part, key in (("train", "loss"), ("validation", "val_loss")):
            if points := [(r["iter"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]:
                curves[f"{label} {part}"], colours[f"{label} {part}"] = points, colour
        if not any(name.startswith(f"{label} ") for name in curves):
            p.error(f"{d / 'metrics.jsonl'} has no loss to draw")
    runlog.write_or_stop(args.out, runlog.loss_svg(curves, colours=colours))
    for label, d in zip(labels(args.runs), args.runs):
        last = {part: curves[f"{label} {part}"][-1] for part in ("train", "validation") if f"{label} {part}" in curves}
        print(f"{label}: " + ", ".join(f"{part} loss {y:.4f} at iteration {x}" for part, (x, y) in last.items()))
    print(f"curves: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
