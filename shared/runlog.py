"""A live log line every few iterations, metrics.jsonl (every iteration), summary.json and loss.svg at the end."""
import json
import math
import sys
import time
from pathlib import Path


class RunLog:
    """Log of one training run of `total` iterations, printing every `every`-th (0: about 25 lines a run)."""

    def __init__(self, out: Path, total: int, every: int = 0):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out / "metrics.jsonl", "w")
        self.rows: list[dict] = []
        self.total, self.every = total, every or max(1, math.ceil(total / 25))
        self.start = self.t0 = time.perf_counter()

    def log(self, it: int, loss: float, lr: float, tokens: int | None = None, **extra) -> None:
        """One row: iter, loss, lr, ms since the last call, tokens/s when `tokens` is given, and any extras.

        A loss that is nan or inf ends the run here: summary.json says where, and the process exits non-zero.
        """
        t1 = time.perf_counter()
        dt, self.t0 = t1 - self.t0, t1
        row = {"iter": it, "loss": finite(round(loss, 6)), "lr": lr, "ms": round(dt * 1000, 2), **extra}
        if tokens is not None:
            row["tok_per_s"] = round(tokens / dt)
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if it % self.every == 0 or it == self.total - 1 or not math.isfinite(loss):
            self.print_line(row, loss)
        if not math.isfinite(loss):
            self.close(diverged={"iter": it, "loss": str(loss), "lr": lr})
            sys.exit(f"error: the loss is {loss} at iteration {it} (lr {lr:g}): training diverged. "
                     "A smaller --lr may help.")

    def print_line(self, row: dict, loss: float) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / (row["iter"] + 1) * (self.total - row["iter"] - 1)
        line = f"iter {row['iter']:5d} | loss {loss:.4f} | lr {row['lr']:.2e} | {row['ms']:8.2f} ms"
        if "tok_per_s" in row:
            line += f" | {row['tok_per_s']:>9,} tok/s"
        extra = {k: v for k, v in row.items() if k not in ("iter", "loss", "lr", "ms", "tok_per_s")}
        line += "".join(f" | {k} {v:.4g}" if isinstance(v, float) else f" | {k} {v}" for k, v in extra.items())
        print(f"{line} | {clock(elapsed)} elapsed, eta {clock(eta)}", flush=True)

    def close(self, **summary) -> None:
        """Finish the run: summary.json (e.g. the validation loss) and the loss curve."""
        self.file.close()
        if summary:
            (self.out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1) + "\n")
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                            if not isinstance(v, dict)))
        points = [(r["iter"], r["loss"]) for r in self.rows if r["loss"] is not None]
        if len(points) > 1:
            (self.out / "loss.svg").write_text(loss_svg(*zip(*points)))
            print(f"metrics: {self.out / 'metrics.jsonl'}   loss curve: {self.out / 'loss.svg'}")


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


def loss_svg(iters: list[int], losses: list[float], w: int = 640, h: int = 360, pad: int = 48) -> str:
    """A loss curve as a self-contained SVG (open it in a browser); no plotting library needed."""
    x0, x1, y0, y1 = min(iters), max(iters), min(losses), max(losses)
    sx = lambda x: pad + (x - x0) / max(x1 - x0, 1e-9) * (w - 2 * pad)
    sy = lambda y: h - pad - (y - y0) / max(y1 - y0, 1e-9) * (h - 2 * pad)
    points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(iters, losses))
    return f"""<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="white"/>
<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>
<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>
<text x="{pad}" y="{pad - 8}">loss {y1:.3f}</text>
<text x="4" y="{h - pad}">{y0:.3f}</text>
<text x="{pad}" y="{h - pad + 16}">iter {x0}</text>
<text x="{w - pad}" y="{h - pad + 16}" text-anchor="end">iter {x1}</text>
</svg>
"""
