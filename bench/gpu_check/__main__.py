"""Entry point of ``python -m bench.gpu_check``.

Triton decides once, when a kernel is defined, whether it runs on a GPU or under its interpreter
(metarm_fast.kernels._dispatch.is_interpreted): a dry run on a machine without CUDA must switch
the interpreter on before anything imports metarm_fast.kernels, so that happens first, here.
"""
import os
import sys

if "--dry-run" in sys.argv[1:]:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from bench.gpu_check.runner import main  # noqa: E402

sys.exit(main())
