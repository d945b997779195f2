from setuptools import setup

setup(
    name="llama4-fast",
    version="0.1.0",
    description="Triton kernels that make Llama 4 (Scout, Maverick) inference fast on Hopper GPUs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # `kernels/` ships as `llama4_fast.kernels`: the top-level name `kernels` belongs to
    # Hugging Face's kernel-hub package, which transformers imports.
    packages=["llama4_fast", "llama4_fast.kernels"],
    package_dir={"llama4_fast": "llama4_fast", "llama4_fast.kernels": "kernels"},
    package_data={"llama4_fast.kernels": ["configs/*.json"]},
    install_requires=["torch>=2.6", "triton>=3.3", "safetensors", "numpy"],
    extras_require={
        "hf": ["transformers>=4.57"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers>=4.57", "accelerate", "peft"],
        "bench": ["pytest-benchmark", "matplotlib", "transformers>=4.57"],
    },
    entry_points={"console_scripts": ["llama4-fast=llama4_fast.cli:main"]},
)
