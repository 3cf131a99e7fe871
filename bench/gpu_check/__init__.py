"""``python -m bench.gpu_check``: the checks that need a GPU, in one unattended command.

Sections (one module each): ``kernels`` (the Triton kernels against their torch references),
``attention`` (FlexAttention / FlashAttention 2 varlen against padded SDPA), ``step`` (the
recommended one-GPU MetaRM step: memory against bench.plan, step time, MFU, the meta machinery's
share, the realised perturbation, the copy-based step), ``trl_step`` (TRL's RewardTrainer on the
same model and batches), ``speed`` (--compile and --liger against the eager step) and ``fsdp``
(torchrun FSDP2 against one GPU). ``runner`` runs them, each under its own time limit, and
``report`` writes the JSON report after every section. ``--dry-run`` runs them all at toy size on a
CPU (Triton through its interpreter). Nothing here is imported by the library.
"""
