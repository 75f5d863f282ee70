"""Print the tensor shapes through a model: one forward pass with a hook on every module."""
import torch

from shared import cli


def show(model: torch.nn.Module, *inputs: torch.Tensor, depth: int = 2) -> None:
    """Print rows(model, *inputs, depth=depth)."""
    print(f"shapes through one forward pass of {cli.plural(len(inputs[0]), 'row')} (a training batch may have more):")
    for name, kind, shape in rows(model, *inputs, depth=depth):
        print(f"  {name:<24} {kind:<20} {shape}")


def rows(model: torch.nn.Module, *inputs: torch.Tensor, depth: int = 2) -> list[tuple[str, str, tuple]]:
    """(name, module type, output shape) of each module down to `depth` levels, in the order they finish.

    A module shared by two parents (step 06's embedding, used by the encoder and the decoder) is
    named after the parent that is running it.
    """
    found = [(f"input {i}", "", tuple(x.shape)) for i, x in enumerate(inputs)]
    names: dict[torch.nn.Module, list[str]] = {}  # module -> every name it has
    for name, m in model.named_modules(remove_duplicate=False):
        if name and name.count(".") < depth:
            names.setdefault(m, []).append(name)
    running: list[str] = []  # names of the modules whose forward has started and not finished

    def enter(module, args):
        parent = running[-1] + "." if running else ""
        running.append(next((n for n in names[module] if n.startswith(parent)), names[module][0]))

    def leave(module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        found.append((running.pop(), type(module).__name__, tuple(out.shape)))

    handles = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return found
