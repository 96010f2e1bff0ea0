"""effjax: efficient large-batch training in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8.6",
    "importlib_resources>=6.0",  # TFDS needs it to build a dataset defined in a package.
    "ml-collections>=1.1.0",
    "absl-py>=2.1.0",
    "numpy>=2.0",
    "mnist1d>=0.0.2.post1",
    "scikit-learn>=1.5",
    "tensorboardX>=2.6.2",
    "pillow>=10.0",
    "matplotlib>=3.8",  # curves.png at the end of every run (effjax.plot).
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.6",  # make test: two workers, one per core.
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
    ],
    # Open and run notebooks/*.ipynb: jupyter (lab and nbconvert) and TensorBoard.
    "notebooks": ["jupyterlab>=4.0", "nbconvert>=7.16", "ipykernel>=6.29", "tensorboard>=2.16"],
    # TensorBoard for the event files every run writes to WORKDIR/tensorboard.
    "tensorboard": ["tensorboard>=2.16"],
    # benchmarks/train_step.py --torch only; never needed by effjax itself.
    "bench": ["torch==2.13.0", "matplotlib>=3.8"],
}

setuptools.setup(
    name="effjax",
    version="0.1.0",
    description="Efficient large-batch training in JAX/Flax.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["effjax", "effjax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
