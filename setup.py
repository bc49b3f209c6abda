"""qla_megatron: Gated DeltaNet linear attention for long-sequence pretraining on Megatron-core."""

from setuptools import find_packages, setup

setup(
    name="qla_megatron",
    version="0.1.0",
    description="Fused Hopper kernels, intra-card and cross-GPU context parallelism, and a Megatron-core "
                "layer for the gated delta rule (Gated DeltaNet)",
    packages=find_packages(include=["qla_megatron", "qla_megatron.*"]),
    python_requires=">=3.11",
    # Pinned as DESIGN §4 says. megatron-core 0.19.2 declares Python >= 3.12 but runs on 3.11: on 3.11
    # scripts/setup_env.sh installs it with --no-deps --ignore-requires-python after its dependencies.
    install_requires=[
        "torch>=2.11",            # 2.13.0 on the CPU machines (requirements/cpu.txt), 2.11 on the GPU host
        "numpy",
        "packaging>=24.2",
        "triton>=3.6",            # megatron-core imports it at import time
        "tilelang==0.1.15",
        "einops>=0.8",
        "megatron-core==0.19.2; python_version >= '3.12'",
    ],
    extras_require={
        "test": ["pytest==9.2.0"],
        # Optional peers for benchmarks and cross-checks; never needed at run time.
        "peers": ["fla-core==0.6.0", "flash-qla==0.1.3"],
    },
)
