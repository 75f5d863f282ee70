"""GPT.from_pretrained: HF's GPT-2 weights, Conv1D transposed; top-k sampling; a generation command."""
