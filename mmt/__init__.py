"""mmt: post-training Hugging Face causal LMs for multilingual machine translation.

The pipeline (``data`` -> ``methods`` -> ``train`` -> ``evaluate``) is imported lazily; importing
``mmt`` is cheap and never loads ``mmt_kernels``.
"""

__version__ = "0.1.0"

from mmt import arch as _arch  # noqa: F401  saved changed architectures reload via AutoModelForCausalLM

__all__ = ["__version__"]
