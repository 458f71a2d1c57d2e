"""Fused ops of the BBF DiT, one folder each: `reference.py` (eager PyTorch, the oracle, CPU-runnable)
and `triton.py` (the GPU kernel). The two never import each other; `bbf_rt.ops` chooses between them."""
