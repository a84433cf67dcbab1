"""specialize_jax: specializing small T5/FlanT5 students for multi-step reasoning, in JAX."""
import setuptools

# Versions verified together on Python 3.11 (docs/benchmarks.md records the suite on them).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    # The path layer (specialize_jax/data/storage.py): local paths and gs:// alike, as orbax uses.
    "etils[epath]==1.15.0",
    "seqio==0.0.20",
    # Prepared training sets (prepared/prepared_data.py), local or gs:// (a GCS reader from 0.8 on;
    # 0.8.6 verified against the GCS emulator by tests/test_storage.py).
    "array-record==0.8.6",
    # tensorflow-text pulls full tensorflow even beside tensorflow-cpu, so depend on it directly.
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    # tensorflow-datasets 4.9.10 imports it while preparing a dataset without declaring it.
    "importlib_resources",
    "gin-config==0.5.0",
    # TensorBoard event files (tf.summary needs the tensorboard package; tensorflow does not pull it).
    "tensorboard==2.21.0",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "msgpack",
    # Teacher sampling (`specialize teacher`); imported only by that command.
    "openai==3.57.0",
    "safetensors",
    # Sweep reports and comparison plots (`specialize sweep`, `specialize compare`, the demo).
    "matplotlib==3.11.2",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest==9.0.3",
        # Two test workers, a whole file each (`.ci/run`): module fixtures run once.
        "pytest-xdist==3.8.0",
        # Test-only peers for parity checks (CPU wheel of torch is local on the dev machines).
        "torch==2.13.0",
        "transformers==5.24.0",
        # gs:// against a local GCS emulator (tests/test_storage.py): epath's fsspec backend.
        "gcsfs==2026.10.1",
        "gcp-storage-emulator==2026.7.19",
    ],
}

setuptools.setup(
    name="specialize_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    # The repository keeps the SeqIO registrations in tasks/ and the configs in gin/ at its top
    # level; an install carries them as `specialize_jax.tasks` and `specialize_jax/gin/`, so no
    # top-level `tasks` package is installed and the configs travel with a wheel.
    packages=setuptools.find_packages(include=["specialize_jax", "specialize_jax.*"]) + [
        "specialize_jax.tasks", "specialize_jax.gin"],
    package_dir={"specialize_jax.tasks": "tasks", "specialize_jax.gin": "gin"},
    # gin/reference/*.json: reference numbers `specialize report --reference NAME` finds by name.
    package_data={"specialize_jax.gin": ["*/*.gin", "reference/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["specialize=specialize_jax.cli:main"]},
)
