"""vitjax: vision transformers in JAX/Flax.

    import vitjax
    model = vitjax.create_model('vit_base_patch16_224')
    params = vitjax.load_weights(model, 'ViT-B_16.npz')
    logits, out = model.apply({'params': params}, images)  # NHWC float images
"""

import importlib

__version__ = "0.1.0"
# Public names, imported on first use (PEP 562), so that `python -m vitjax.train`
# can answer `--help` or a locked workdir before JAX is imported.
_EXPORTS = {
    "CheckpointError": "vitjax.convert", "CheckpointMismatchError": "vitjax.convert",
    "load_weights": "vitjax.convert", "save_weights": "vitjax.convert",
    "UnknownModelError": "vitjax.models", "create_model": "vitjax.models",
    "init_params": "vitjax.models", "list_models": "vitjax.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  try:  # Submodules: `import vitjax; vitjax.text.ByteTokenizer`.
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_EXPORTS))
