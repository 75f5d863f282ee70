"""The project's helpers that are not a lesson: step registry, data, tokenizers, device, run log."""
