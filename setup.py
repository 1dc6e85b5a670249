"""vitjax: vision transformers in JAX/Flax."""

import setuptools

# Bounds. Lower: the oldest versions vitjax runs with, checked by installing them
# together (uv pip install --resolution lowest-direct) and running tests/test_models.py,
# test_train.py, test_optim.py and test_load_weights_errors.py (2026-12-02, Python 3.11).
# Where a floor comes from a feature, it says which. Upper: below the next
# release series after the newest version tested (constraints.txt, which `make test`
# installs; JAX 0.11 on the GPU machine): the next minor version for 0.x packages, the
# next major one otherwise, calendar versions included (regex). tests/test_setup.py
# checks that these bounds admit every version pinned in constraints.txt.
INSTALL_REQUIRES = [
    "jax>=0.7.0,<0.12",  # 0.7.0: Pallas' pltpu.CompilerParams / pltriton.CompilerParams.
    "flax>=0.10.4,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11.33,<0.13",  # From 0.11.17 with JAX 0.7; quiet restores from 0.11.33.
    "tensorflow-datasets>=4.9.7,<5",
    "grain>=0.2.13,<0.3",  # 0.2.13: ReadOptions(num_threads=0), reading in the caller.
    "ml-collections>=1.0.0,<2",
    "chex>=0.1.88,<0.2",
    "absl-py>=2.0,<3",
    "numpy>=1.26,<3",
    "scikit-learn>=1.3,<2",
    "tqdm>=4.66,<5",
    "matplotlib>=3.8,<4",
    "safetensors>=0.4,<0.9",
    "tensorboardX>=2.6,<3",  # TensorBoard event files without TensorFlow.
    "regex>=2023.0,<2027",  # Unicode classes in CLIP's BPE pre-tokenizer (vitjax.text.clip_bpe).
    "qwix>=0.1.8,<0.2",  # Post-training quantization (vitjax.quantize); imported only there.
]

EXTRAS_REQUIRE = {
    # The PyTorch CPU build is the numerical oracle for weight conversion.
    # `make test` installs torch==2.13.0 first so that pip does not pull a CUDA build.
    "test": ["pytest>=8.0,<10", "pytest-xdist>=3.5,<4", "torch>=2.4,<3",
             "transformers>=4.46,<6",
             "diffusers>=0.30,<0.43",  # DiT and AutoencoderKL: the oracles of vitjax.diffusion.
             "peft>=0.13,<0.22"],  # LoRA on transformers' ViT: the oracle of vitjax.adapt.
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
