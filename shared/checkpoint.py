"""Training checkpoints: written atomically, read as tensors only, refused with a message when they do not fit.

A checkpoint is one file, DIR/checkpoint.pt: a dict of the run's config, the model's and the optimizer's
state, the next iteration, the data loader's position and the random number generators' states.
"""
import contextlib
import json
import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path

import torch

from shared import cli

NAME = "checkpoint.pt"
KEYS = {"config": dict, "iter": int, "model": dict, "optimizer": dict, "loader": int, "rng": dict}  # what a step saves


def save(out: Path, state: dict) -> None:
    """Write DIR/checkpoint.pt whole under a temporary name, on the disk, then rename it: a crash mid-write (of the
    run or of the machine) leaves the last good checkpoint in place, never a broken file under the real name. A
    write that fails (a full disk) stops the run with one line."""
    path, tmp = Path(out) / NAME, Path(out) / f"{NAME}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes on the disk before the name: else a crash could keep the name only
        os.replace(tmp, path)  # atomic on one file system
    except (OSError, RuntimeError) as e:  # a disk full mid-write: torch's zip writer adds a RuntimeError as it closes
        if isinstance(e.__context__, KeyboardInterrupt):  # a Ctrl-C mid-write, which the zip writer's close hides
            raise e.__context__ from None
        failed = next((x for x in (e, e.__context__) if isinstance(x, OSError)), None)
        if failed is None:
            raise
        kept = f"; {path} is the last one written" if path.is_file() else ""
        sys.exit(f"error: cannot write a checkpoint to {out} ({cli.reason(failed)}){kept}")
    finally:  # gone once renamed; else half a checkpoint (a full disk, a second Ctrl-C) would be left behind
        tmp.unlink(missing_ok=True)


def load(out: Path) -> dict:
    """Read DIR/checkpoint.pt with weights_only=True (tensors and plain data only: loading runs no code).
    Exits with one line when it is missing, truncated, not a checkpoint or holds weights that are nan or inf."""
    path = Path(out) / NAME
    if not path.exists():
        sys.exit(f"error: no checkpoint to resume from: {path} does not exist")
    try:
        with warnings.catch_warnings():  # a pickle not written by torch.save: the error below says it, not a warning
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects other than tensors
        sys.exit(f"error: {path} is not a readable checkpoint ({why_unreadable(path, e)}). Delete it, or start the "
                 "run afresh with another --out.")
    if not isinstance(state, dict):
        sys.exit(f"error: {path} is not a checkpoint of this project (not a dict of the run's state)")
    if missing := [k for k, kind in KEYS.items() if not isinstance(state.get(k), kind)]:
        sys.exit(f"error: {path} is not a checkpoint of this project (no {', no '.join(missing)} of the right kind)")
    if state["iter"] < 0 or state["loader"] < 0:
        sys.exit(f"error: {path} is not a checkpoint of this project (iteration {state['iter']}, loader position "
                 f"{state['loader']}: a step saves neither below 0)")
    rng, opt = state["rng"], state["optimizer"]
    if not (torch.is_tensor(rng.get("cpu")) and rng["cpu"].dtype == torch.uint8 and isinstance(rng.get("cuda"), list)
            and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        sys.exit(f"error: {path} is not a checkpoint of this project (its rng or optimizer is not as a step saves it)")
    if bad := [k for k, w in state["model"].items() if torch.is_tensor(w) and not w.float().isfinite().all()]:
        sys.exit(f"error: {path} has nan or inf in {bad[0]} ({len(bad)} of its tensors): the run diverged before it "
                 "was saved, or the file is damaged. Start the run afresh with another --out (a smaller --lr if it "
                 "diverged).")
    return state


def why_unreadable(path: Path, e: Exception) -> str:
    """Why torch.load failed, in words: torch.save writes a zip archive of a pickle and the tensors' bytes."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # a zip archive's first bytes
                return "not the zip archive that torch.save writes"
        if not zipfile.is_zipfile(path):  # the archive's index is at its end
            return "cut short: the write that made it did not finish"
    except OSError as err:  # a directory of that name, a file not readable, or gone
        return cli.reason(err)
    if isinstance(e, pickle.UnpicklingError) and "Weights only" in str(e):
        return "damaged, or it holds objects other than tensors and plain data: weights_only=True builds none"
    return f"damaged: {' '.join(str(e).split())[:200]}"


@contextlib.contextmanager
def restoring(out: Path):
    """Around putting a checkpoint's states into the model, the optimizer and the random generators: one that does not
    fit them (a weight missing or of another shape, as after an edit by hand) stops the run in one line."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # load_state_dict's own errors, several lines long
        said = " ".join(str(e).split())[:300]
        sys.exit(f"error: {Path(out) / NAME} does not fit this run ({said}): damaged or edited. Delete it, or start "
                 "the run afresh with another --out.")


def check_config(path: Path, theirs: dict, ours: dict) -> None:
    """Exit with the differences when a checkpoint was written by another step or with another config."""
    keys = sorted(theirs.keys() | ours.keys(), key=lambda k: (k != "step", k))  # another step first: the cause
    said = lambda run, k: repr(run[k]) if k in run else "no such setting"  # a setting of one step, not the other's
    if diff := [f"{k}: {said(theirs, k)} in the checkpoint, {said(ours, k)} now" for k in keys
                if theirs.get(k) != ours.get(k)]:
        go_on = printed_resume(path)
        sys.exit(f"error: {path / NAME} was saved with other settings than these; resume it with the command that "
                 "started it.\n  "
                 + "\n  ".join(diff) + (f"\nIts Ctrl-C printed that command:\n  {go_on}" if go_on else ""))


def printed_resume(out: Path) -> str | None:
    """The command that goes on, as a run stopped by Ctrl-C wrote it in its summary.json; None for any other run."""
    try:
        go_on = json.loads((Path(out) / "summary.json").read_text())["interrupted"]["resume"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return go_on if isinstance(go_on, str) else None


def refuse_to_overwrite(out: Path) -> None:
    """A new run never destroys an earlier run's checkpoint: it stops and says what to do instead."""
    path = Path(out) / NAME
    if not path.exists():
        return
    if not zipfile.is_zipfile(path):  # reads the archive's index at the end, not the whole file as torch.load would
        sys.exit(f"error: {out} holds a checkpoint of an earlier run that cannot be read ({why_unreadable(path, None)}"
                 f"): nothing can resume from it. Start the new run elsewhere with --out, or delete {path} yourself.")
    said = {"finished": "a finished run (its checkpoint, model/ and loss curve)",  # --resume: "nothing to resume"
            "diverged": "a run that diverged (resumed, it keeps its --lr and diverges again)"}.get(how_it_ended(out))
    if said:
        sys.exit(f"error: {out} holds {said}. Start the new run elsewhere with --out, or delete "
                 f"{Path(out) / NAME} yourself.")
    sys.exit(f"error: {out} already holds a checkpoint of an earlier run. Continue it with --resume {out}, "
             f"start the new run elsewhere with --out, or delete {Path(out) / NAME} yourself.")


def how_it_ended(out: Path) -> str | None:
    """What out's summary.json says of its run: "finished", "diverged", or None (stopped by Ctrl-C, not there or
    unreadable: a run that can go on, as far as is known)."""
    try:
        summary = json.loads((Path(out) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or "interrupted" in summary:
        return None
    return "diverged" if "diverged" in summary else "finished"
