"""Print the tensor shapes through a model: one forward pass with a hook on every module."""
import torch


def show(model: torch.nn.Module, *inputs: torch.Tensor, depth: int = 2) -> None:
    """Output shape of each module down to `depth` levels, in the order they finish."""
    rows = [(f"input {i}", "", tuple(x.shape)) for i, x in enumerate(inputs)]

    def hook(name):
        def record(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            rows.append((name, type(module).__name__, tuple(out.shape)))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and n.count(".") < depth]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    print("shapes through one forward pass:")
    for name, kind, shape in rows:
        print(f"  {name:<24} {kind:<20} {shape}")
