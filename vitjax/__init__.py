"""vitjax: vision transformers in JAX/Flax.

    import vitjax
    model = vitjax.create_model('vit_base_patch16_224')
    params = vitjax.load_weights(model, 'ViT-B_16.npz')
    logits, out = model.apply({'params': params}, images)  # NHWC float images
"""

from vitjax.convert import CheckpointError, CheckpointMismatchError, load_weights, save_weights
from vitjax.models import UnknownModelError, create_model, init_params, list_models
from vitjax import text  # Tokenizers for the two-tower models: vitjax.text.ByteTokenizer.

__version__ = "0.1.0"
__all__ = ["CheckpointError", "CheckpointMismatchError", "UnknownModelError", "create_model",
           "init_params", "list_models", "load_weights", "save_weights"]
