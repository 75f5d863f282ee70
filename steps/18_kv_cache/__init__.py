"""Generation with a KV cache: each layer keeps its keys and values, and each new token is one position forward."""
