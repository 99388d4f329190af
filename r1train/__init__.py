"""A compact GRPO trainer on r1kernels: the DeepSeek-R1 recipe end to end (`r1-train`)."""
