"""Glue for training frameworks, one module per framework.

Each module imports its framework inside itself, so ``import samkit`` never
pulls one in. Plain ``torch.distributed`` DDP needs no glue: pass the DDP
module as ``SAM(..., model=ddp_model)`` (see docs/ddp.md).
"""
