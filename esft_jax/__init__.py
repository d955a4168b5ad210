"""esft-jax: Expert-Specialized Fine-Tuning of Mixture-of-Experts language models in JAX."""

__version__ = "0.1.0"
