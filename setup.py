from setuptools import find_packages, setup

setup(
    name="fastvl",
    version="0.1.0",
    description="Fused Triton kernels and model code for fast small vision-language models",
    python_requires=">=3.10",
    packages=["fastvl", "fastvl.kernels", "fastvl.bench"]
    + ["fastvl." + p for p in find_packages("fastvl")],
    # kernels/ and bench/ live at the top level of the repository but are imported as
    # fastvl.kernels and fastvl.bench (an editable install resolves the mapping too).
    package_dir={"fastvl": "fastvl", "fastvl.kernels": "kernels", "fastvl.bench": "bench"},
    package_data={"fastvl.train": ["configs/*.json"]},  # the shipped DeepSpeed ZeRO configs
    install_requires=["torch>=2.5", "triton>=3.2; platform_system=='Linux'", "numpy"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "transformers>=5.0"],
        "hf": ["transformers>=5.0", "safetensors", "pillow"],
        "train": ["deepspeed"],
        "bench": ["matplotlib"],
        "gpu": ["flash-attn", "xformers"],
    },
    entry_points={"console_scripts": ["fastvl=fastvl.cli:main"]},
)
