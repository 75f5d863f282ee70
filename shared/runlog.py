"""A live log line per iteration, metrics.jsonl in the run directory, summary.json and loss.svg at the end."""
import json
import time
from pathlib import Path


class RunLog:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out / "metrics.jsonl", "w")
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()

    def log(self, it: int, loss: float, tokens: int | None = None, **extra) -> None:
        """One row: iter, loss, ms since the last call, tokens/s when `tokens` is given, and any extras."""
        t1 = time.perf_counter()
        dt, self.t0 = t1 - self.t0, t1
        row = {"iter": it, "loss": round(loss, 6), "ms": round(dt * 1000, 2), **extra}
        if tokens is not None:
            row["tok_per_s"] = round(tokens / dt)
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        line = f"iter {it:5d} | loss {loss:.4f} | {row['ms']:8.2f} ms"
        if tokens is not None:
            line += f" | {row['tok_per_s']:>9,} tok/s"
        print(line + "".join(f" | {k} {v:.4g}" if isinstance(v, float) else f" | {k} {v}" for k, v in extra.items()),
              flush=True)

    def close(self, **summary) -> None:
        """Finish the run: summary.json (e.g. the validation loss) and the loss curve."""
        self.file.close()
        if summary:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
        if len(self.rows) > 1:
            (self.out / "loss.svg").write_text(loss_svg([r["iter"] for r in self.rows], [r["loss"] for r in self.rows]))
            print(f"metrics: {self.out / 'metrics.jsonl'}   loss curve: {self.out / 'loss.svg'}")


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
