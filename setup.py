"""vitjax: vision transformers in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.6.0",
    "flax>=0.10.4,<1",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "tensorflow-datasets>=4.9.7",
    "grain>=0.2.6",
    "ml-collections>=1.0.0",
    "chex>=0.1.88",
    "absl-py>=2.0",
    "numpy>=1.26",
    "scikit-learn>=1.3",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "safetensors>=0.4",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow.
    "regex>=2023.0",  # Unicode classes in CLIP's BPE pre-tokenizer (vitjax.text.clip_bpe).
]

EXTRAS_REQUIRE = {
    # The PyTorch CPU build is the numerical oracle for weight conversion.
    # `make test` installs torch==2.13.0 first so that pip does not pull a CUDA build.
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "torch>=2.4", "transformers>=4.46"],
}

setuptools.setup(
    name="vitjax",
    version="0.1.0",
    description="Vision transformers in JAX/Flax: models, weights, one trainer.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["vitjax", "vitjax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
