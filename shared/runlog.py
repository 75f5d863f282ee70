"""A live log line every few iterations, metrics.jsonl (every iteration), summary.json and loss.svg at the end."""
import contextlib
import fcntl
import html
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from shared import checkpoint, cli

BUSY = "error: another run is writing to {} now: wait for it to end, or give this one another --out"
QUIET_S = 60  # with --log-every 0, a line at the first iteration's end this long after the last line (seconds)


def rows_before(path: Path, start: int) -> list[dict]:
    """The rows of a resumed run's iterations before `start`. A metrics.jsonl that is gone, or a line cut off by a
    crash, does not stop the resume: what can be read is kept, and a note says what is left out."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError) as e:
        print(f"note: {path} cannot be read ({type(e).__name__}): the log starts again at iteration {start}",
              flush=True)
        return []
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            keep = row["iter"] < start
        except (ValueError, KeyError, TypeError):
            print(f"note: {path}, line {n}, is damaged: the log keeps the {len(rows)} rows before it", flush=True)
            break
        if keep:
            rows.append(row)
    return rows


def metrics_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a metrics.jsonl that make step wrote, and what was wrong with the others: a blank line is skipped,
    a cut-off last line (a run that was killed) ends the curve there, any other bad line is left out and counted."""
    rows, notes, bad = [], [], 0
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) and rows:  # after good rows; a file of nothing but bad lines was never a log
                notes.append("its last line is cut off (a run that was stopped?): the curve ends at the line before")
            else:
                bad += 1
            continue
        good = isinstance(row, dict) and isinstance(row.get("iter"), int) and all(  # json reads NaN; make step writes
            row.get(k) is None or isinstance(row[k], (int, float)) and math.isfinite(row[k])  # null (finite())
            for k in ("loss", "val_loss"))
        if good:
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{cli.plural(bad, 'line')} that {'are not rows' if bad > 1 else 'is not a row'} of make step's "
                     "log left out")
    return rows, notes


def refuse_if_running(out: Path) -> None:
    """Stop at once, in one line, if another run is writing to `out`: before any work, where RunLog's own lock would
    find it only once the model is built. A shared lock, let go at once: it makes no file, holds nothing (a run
    refused later leaves `out` free), and never stops the ranks of one run, which all ask at the same time."""
    try:
        fd = os.open(Path(out) / "metrics.jsonl", os.O_RDONLY)  # a run that is writing made it
    except OSError:  # none there (nothing is writing), or unreadable: RunLog says what is wrong, if anything
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(BUSY.format(out))
    except OSError:  # a file system without locks: RunLog says so
        pass
    finally:
        os.close(fd)


class RunLog:
    """Log of one training run of `total` iterations, printing every `every`-th (0: about 25 lines a run, and one
    at the end of the first iteration QUIET_S seconds or more after the last line: a long run is never silent long)."""

    def __init__(self, out: Path, total: int, every: int = 0, start: int = 0, baseline: tuple | None = None,
                 fresh: bool = False):
        """start > 0 continues a resumed run: metrics.jsonl keeps its rows of the iterations before `start`.
        baseline: (prefix, name, value), e.g. ("hellaswag", "GPT-2 124M", 0.2955): the rows' prefix_acc and
        prefix_acc_norm are drawn in a second panel of the loss curve, with the value as a line to beat.
        fresh: a new run of a step that saves checkpoints. It checked for an earlier run's checkpoint when it started;
        it checks again once it holds the directory, before it empties anything: a run may have ended in between."""
        self.baseline = baseline
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = rows_before(self.out / "metrics.jsonl", start) if start else []
        self.kept = len(self.rows)  # rows of an earlier run, not timed by this one
        self.file = open(self.out / "metrics.jsonl", "a")  # not "w": emptied only once this run holds the lock
        try:  # one run at a time in a directory; the lock goes when the file is closed or the process ends
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(BUSY.format(self.out))
        except OSError as e:  # a file system without locks (some network mounts): run, unguarded
            print(f"note: {self.out} cannot be locked ({os.strerror(e.errno)}): nothing stops a second run from "
                  "writing there at the same time", flush=True)
        if fresh:
            checkpoint.refuse_to_overwrite(self.out)
        self.taken = False  # out as it was until this run has a row to write (take_over): a failed start wipes no file
        self.total, self.every, self.first = total, every or max(1, math.ceil(total / 25)), start
        self.quiet_s = math.inf if every else QUIET_S
        self.start = self.t0 = self.printed = time.perf_counter()
        self.after_first = None  # when this run's first iteration ended: the ETA leaves its start-up cost out

    def take_over(self) -> None:
        """Once this run has something to write: metrics.jsonl holds its rows (and a resumed run's earlier ones), and
        a new run removes an earlier run's summary and curve, which would not be this run's."""
        if self.taken:
            return
        self.taken = True
        self.file.truncate(0)
        self.file.writelines(json.dumps(r) + "\n" for r in self.rows)
        if not self.first:
            for name in ("summary.json", "loss.svg"):
                (self.out / name).unlink(missing_ok=True)

    def log(self, it: int, loss: float, lr: float, tokens: int | None = None, **extra) -> None:
        """One row: iter, loss, lr, ms since the last call, tokens/s when `tokens` is given, and any extras.

        A loss that is nan or inf ends the run here: summary.json says where, and the process exits non-zero.
        """
        t1 = time.perf_counter()
        dt, self.t0 = t1 - self.t0, t1
        row = {"iter": it, "loss": finite(round(loss, 6)), "lr": lr, "ms": round(dt * 1000, 2), **extra}
        if tokens is not None:
            row["tok_per_s"] = round(tokens / dt)
        self.write(row)
        if self.after_first is None:
            self.after_first = t1
        if it % self.every == 0 or it == self.total - 1 or not math.isfinite(loss) or t1 - self.printed >= self.quiet_s:
            self.print_line(row, loss)
        if not math.isfinite(loss):
            self.close(diverged={"iter": it, "loss": str(loss), "lr": lr})
            sys.exit(f"error: the loss is {loss} at iteration {it} (lr {lr:g}): training diverged. A smaller --lr may "
                     "help" + (" in a new run (a resumed one keeps the --lr it started with)." if self.first else "."))

    def log_val(self, it: int, val_loss: float, **more: float) -> None:
        """The validation loss after iteration `it`, and any other evaluation (more, e.g. hellaswag_acc=0.27): a row of
        its own in metrics.jsonl, and a line."""
        row = {"iter": it, "val_loss": finite(round(val_loss, 6)), **{k: finite(round(v, 6)) for k, v in more.items()}}
        self.write(row)
        print(f"iter {it:5d} | val loss {val_loss:.4f}" + "".join(f" | {k} {v:.4f}" for k, v in more.items()),
              flush=True)
        self.t0 = self.printed = time.perf_counter()  # evaluating is not the next iteration's time; a line was printed

    def write(self, row: dict) -> None:
        """One row of metrics.jsonl, on the disk at once. A write that fails (a full disk) stops the run in one line."""
        self.take_over()
        self.rows.append(row)
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            with contextlib.suppress(OSError):
                self.file.close()  # tries the unwritten bytes once more: not again, with a traceback, at exit
            cannot_write(self.out / "metrics.jsonl", e)

    def print_line(self, row: dict, loss: float) -> None:
        now = time.perf_counter()
        done = row["iter"] - self.first  # iterations since the first, whose time holds the start-up (compiling, too)
        eta = f", eta {clock((now - self.after_first) / done * (self.total - row['iter'] - 1))}" if done else ""
        line = f"iter {row['iter']:5d} | loss {loss:.4f} | lr {row['lr']:.2e} | {row['ms']:8.2f} ms"
        if "tok_per_s" in row:
            line += f" | {row['tok_per_s']:>9,} tok/s"
        extra = {k: v for k, v in row.items() if k not in ("iter", "loss", "lr", "ms", "tok_per_s")}
        line += "".join(f" | {k} {v:.4g}" if isinstance(v, float) else f" | {k} {v}" for k, v in extra.items())
        print(f"{line} | {clock(now - self.start)} elapsed{eta}", flush=True)
        self.printed = now

    @contextlib.contextmanager
    def closed_on_ctrl_c(self):
        """Ctrl-C inside the block ends the run as it stands: summary.json marked interrupted, with the iterations
        done, and the loss curve so far; then the KeyboardInterrupt goes on. For the steps that keep no checkpoint
        (01-08): from step 10 on, Ctrl-C stops between two iterations and saves one."""
        try:
            yield
        except KeyboardInterrupt:
            self.close(interrupted={"iters_done": sum("loss" in r for r in self.rows)})
            raise

    def close(self, **summary) -> None:
        """Finish the run, or stop it: summary.json (e.g. the validation loss) and the loss curve so far."""
        self.take_over()
        self.file.close()
        if summary:
            write_or_stop(self.out / "summary.json", json.dumps(jsonable(summary), indent=1) + "\n")
            if line := "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                                 if not isinstance(v, dict) and jsonable(v) is not None):
                print(line)
        curves = {name: [(r["iter"], r[key]) for r in self.rows if r.get(key) is not None]
                  for name, key in (("train", "loss"), ("validation", "val_loss"))}
        below = None
        if self.baseline and (acc := [r for r in self.rows if r.get(f"{self.baseline[0]}_acc_norm") is not None]):
            prefix, name, value = self.baseline
            below = (prefix, {k: [(r["iter"], r[f"{prefix}_{k}"]) for r in acc] for k in ("acc", "acc_norm")}
                     | {f"{name}: acc_norm {value}": [(acc[0]["iter"], value), (acc[-1]["iter"], value)]})
        if timed := [r for r in self.rows[self.kept:] if "ms" in r]:  # this run's iterations, not the evaluations
            ms, tok = statistics.median(r["ms"] for r in timed), [r["tok_per_s"] for r in timed if "tok_per_s" in r]
            print(f"speed: median {ms:.2f} ms an iteration" + (f", {statistics.median(tok):,.0f} tok/s" if tok else "")
                  + f" over this run's {cli.plural(len(timed), 'iteration')}; "
                  f"{clock(time.perf_counter() - self.start)} since the first")  # building, compiling: before it
        drawn = len(curves["train"]) > 1  # a curve needs two points
        if drawn:
            write_or_stop(self.out / "loss.svg", loss_svg(curves, below=below))
        print(f"metrics: {self.out / 'metrics.jsonl'}   " + (f"loss curve: {self.out / 'loss.svg'}" if drawn else
                                                               "no loss curve: it needs two iterations"))


def cannot_write(path: Path, e: OSError):
    sys.exit(f"error: cannot write {path} ({cli.reason(e)})")


def write_or_stop(path: Path, text: str) -> None:
    """path.write_text(text); a write that fails (a full disk) stops the run in one line."""
    try:
        path.write_text(text)
    except OSError as e:
        cannot_write(path, e)


def finite(x: float) -> float | None:
    """JSON has no nan or inf: such a value is written as null."""
    return x if math.isfinite(x) else None


def jsonable(value):
    """A summary with every nan or inf float, however deep, replaced by None."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return finite(value) if isinstance(value, float) else value


def clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


COLOURS = {"train": "#1f77b4", "validation": "#d62728", "acc_norm": "#2ca02c", "acc": "#9467bd"}


def loss_svg(curves: dict[str, list[tuple[int, float]]], w: int = 640, h: int = 360, pad: int = 48,
             below: tuple[str, dict] | None = None, colours: dict[str, str] | None = None) -> str:
    """Loss curves as a self-contained SVG (open it in a browser); no plotting library needed.
    curves: name -> [(iter, loss), ...]; a curve of one point is drawn as a dot. below: (label, curves) of a second
    panel under the first, on the same iterations (e.g. HellaSwag's accuracy). colours: name -> colour, for names
    not in COLOURS; a name ending in "validation" is drawn thicker (few points, each over the whole split)."""
    panels = [("loss", curves), *([below] if below else [])]
    body = "\n".join(panel(c, w, h, pad, label, i * h, colours or {}) for i, (label, c) in enumerate(panels))
    return f"""<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h * len(panels)}" \
viewBox="0 0 {w} {h * len(panels)}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h * len(panels)}" fill="white"/>
{body}
</svg>
"""


def tick(value: float) -> str:
    """An axis label: 3 decimals, or 3 significant digits for a diverged loss (1.84e+11, not 184464392192.000)."""
    return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3g}"


def panel(curves: dict[str, list[tuple[int, float]]], w: int, h: int, pad: int, label: str, top: int,
          colours: dict[str, str]) -> str:
    points = [p for curve in curves.values() for p in curve]
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(y for _, y in points), max(y for _, y in points)
    sx = lambda x: pad + (x - x0) / max(x1 - x0, 1e-9) * (w - 2 * pad)
    sy = lambda y: top + h - pad - (y - y0) / max(y1 - y0, 1e-9) * (h - 2 * pad)
    lines = []
    for i, (name, curve) in enumerate(c for c in curves.items() if c[1]):
        colour = COLOURS.get(name) or colours.get(name, "black")
        width = 2.5 if name.endswith("validation") else 1.5
        xy = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in curve)
        faint = ' stroke-opacity="0.5"' if name.endswith(" train") else ""  # several runs': their validation stands out
        lines.append(f'<polyline points="{xy}" fill="none" stroke="{colour}" stroke-width="{width}"{faint}/>'
                     if len(curve) > 1
                     else f'<circle cx="{sx(curve[0][0]):.1f}" cy="{sy(curve[0][1]):.1f}" r="3" fill="{colour}"/>')
        lines.append(f'<text x="{w - pad}" y="{top + pad + 16 * i}" text-anchor="end" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    body = "\n".join(lines)
    return f"""{body}
<line x1="{pad}" y1="{top + h - pad}" x2="{w - pad}" y2="{top + h - pad}" stroke="black"/>
<line x1="{pad}" y1="{top + pad}" x2="{pad}" y2="{top + h - pad}" stroke="black"/>
<text x="{pad}" y="{top + pad - 8}">{html.escape(label)} {tick(y1)}</text>
<text x="4" y="{top + h - pad}">{tick(y0)}</text>
<text x="{pad}" y="{top + h - pad + 16}">iter {x0}</text>
<text x="{w - pad}" y="{top + h - pad + 16}" text-anchor="end">iter {x1}</text>"""
