"""mmt: post-training Hugging Face causal LMs for multilingual machine translation.

The pipeline (``data`` -> ``methods`` -> ``train`` -> ``evaluate``) is imported lazily; importing
``mmt`` is cheap and never loads ``mmt_kernels`` or torch. It does make the architectures that methods
change (:mod:`mmt.arch`) loadable through transformers' Auto classes: the registration runs as soon as
transformers' auto module loads (or at once if it already has), so ``import mmt`` is all
``AutoModelForCausalLM.from_pretrained(<an mmt model>)`` needs.
"""

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

__all__ = ["__version__"]

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"


class _RegisterAfterAutoImport(importlib.abc.MetaPathFinder):
    """Finds transformers' auto modules like the normal path finder and, once one has executed, registers mmt's
    config type (configuration_auto) or model class (modeling_auto) with it. Removes itself when both are done."""

    def __init__(self):
        self.waiting = {_CONFIG_AUTO, _MODEL_AUTO}

    def find_spec(self, name, path, target=None):
        if name not in self.waiting:
            return None
        self.waiting.discard(name)
        if not self.waiting:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            arch = importlib.import_module("mmt.arch")  # registers the config type (and the model if it can)
            if name == _MODEL_AUTO:
                arch.register_model()

        spec.loader.exec_module = exec_module
        return spec


if _CONFIG_AUTO in sys.modules:
    importlib.import_module("mmt.arch")
elif not any(isinstance(f, _RegisterAfterAutoImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterAutoImport())
