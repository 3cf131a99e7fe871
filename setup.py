"""metarm-fast: a MetaRM reward-model trainer with fused Triton kernels.

The kernels live in `metarm_fast/kernels/`, not at the repository root: a top-level folder called
`kernels` shadows Hugging Face's own `kernels` package (which transformers imports) whenever Python
starts in the repository root.
"""
from setuptools import setup

setup(
    name="metarm-fast",
    version="0.1.0",
    description="Fast, trustworthy MetaRM reward-model training (Dou et al., AAAI 2025)",
    python_requires=">=3.10",
    packages=["metarm_fast", "metarm_fast.data", "metarm_fast.kernels"],
    # torch is a range on purpose: an installed (GPU) torch that satisfies it is left alone.
    # On a machine with none, `make` installs the CPU build first (see Makefile).
    install_requires=[
        "torch>=2.4",
        # Triton ships Linux wheels only; elsewhere (macOS, Windows) the torch paths of every kernel serve.
        "triton>=3.1,<4; platform_system == 'Linux'",
        "transformers>=5.0,<6",
        "datasets>=3.0,<6",
        "bitsandbytes>=0.50,<1",  # <= 0.49 fails on the CPU
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "liger": ["liger-kernel>=0.5"],  # --liger (GPU only)
        "lora": ["peft>=0.13,<1"],
        "tensorboard": ["tensorboard>=2.14,<3"],
        "wandb": ["wandb>=0.17,<1"],
        "trackio": ["trackio>=0.2,<1"],
        # The suite tests LoRA and the tensorboard logging, so it needs their extras.
        # pytest-xdist: pytest.ini runs the suite on 2 workers (the CLI/torchrun tests wait on processes).
        "test": ["pytest", "pytest-xdist>=3.5", "peft>=0.13,<1", "tensorboard>=2.14,<3"],
        "bench": ["trl>=1.0"],
    },
    entry_points={"console_scripts": ["metarm-fast=metarm_fast.cli:main"]},
)
