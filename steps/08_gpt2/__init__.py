"""GPT-2: pre-LN, learned positions, GELU, fused qkv, tied lm_head, HF's names: 124,439,808 parameters."""
