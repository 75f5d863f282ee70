"""Pick the device: auto = cuda, else mps, else cpu. An unavailable choice exits with a message."""
import sys

import torch


def pick(name: str = "auto") -> torch.device:
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if available[d])
    if not available.get(name, False):
        sys.exit(f"error: --device {name} is not available on this machine (available: "
                 f"{', '.join(d for d, ok in available.items() if ok)})")
    return torch.device(name)
