"""scar-jax: the scAR ambient-RNA removal model in JAX/Flax with the scvi-tools ``SCAR`` API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scar-jax")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["SCAR", "__version__"]


def __getattr__(name: str):
    # Lazy import keeps `import scar_jax.datasets` light (no flax/optax import cost).
    if name == "SCAR":
        from .model import SCAR

        return SCAR
    raise AttributeError(f"module 'scar_jax' has no attribute {name!r}")
