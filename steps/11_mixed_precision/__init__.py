"""Mixed precision: TF32 matmuls on CUDA, bf16 autocast where the hardware computes in bf16, fp32 elsewhere."""
