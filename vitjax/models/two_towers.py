"""Two towers (CLIP, SigLIP, LiT): an image and a text encoder in one embedding space.

    model = vitjax.create_model('siglip_base_patch16_224')
    logits, out = model.apply({'params': params}, images, tokens)
    out['img'], out['txt']        # L2-normalised embeddings, [B, embed_dim]
    _, out = model.apply({'params': params}, images, None)   # one tower only

Parameters follow big_vision's two_towers layout: `img/...` (any vitjax image model;
its `head` is the image projection), `txt/...` (`vitjax.models.text.TextTransformer`,
its `head` the text projection), and the learned log-temperature `t` and bias `b`:
logits[i, j] = exp(t) * img_i . txt_j + b. CLIP has no bias (`bias_init=None`) and
starts at t = log(1 / 0.07); SigLIP starts at t = log(10), b = -10. LiT locks the
image tower: `config.optimizer.freeze = '^img/'`.
"""

import math
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models import registry
from vitjax.models import token_merging as token_merging_lib
from vitjax.models import vit
from vitjax.models.partitioning import logical
from vitjax.models.text import TextTransformer

Dtype = Any
CLIP_TEMPERATURE_INIT = math.log(1 / 0.07)
SIGLIP_TEMPERATURE_INIT = math.log(10.0)
SIGLIP_BIAS_INIT = -10.0


def _freeze(options):
  """Options as a hashable FrozenDict (jit treats the module as a static argument)."""
  if options is None:
    return flax.core.FrozenDict()
  if hasattr(options, "to_dict"):  # An ml_collections.ConfigDict from a config file.
    options = options.to_dict()
  return flax.core.FrozenDict({k: tuple(v) if isinstance(v, list) else v
                               for k, v in dict(options).items()})


def l2_normalize(x, eps=1e-8):
  """x / ||x|| over the last axis (in float32)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps), norm[..., 0]


class TwoTowers(nn.Module):
  """`__call__(images, texts, train=False)` -> `(logits or None, out)`.

  Either input may be None to encode one side only (evaluators do). With both,
  `logits` is the [num_images, num_texts] similarity matrix, scaled and shifted.
  `out` holds `img` and `txt` (normalised embeddings), `img/norm` and `txt/norm`
  (their norms before normalising), every intermediate of each tower under
  `img/NAME` and `txt/NAME` (e.g. `img/pre_logits`), and `t` = exp(t), `b`.
  """
  image_model: str = "vit"  # Any registered vitjax image model or family.
  image: Any = None  # Its options (variant=..., image_size=...), a dict.
  text: Any = None  # TextTransformer options, a dict.
  embed_dim: int = 512  # Width of the shared embedding.
  # False: the tower's pooled features are the embedding, without a projection
  # (SigLIP's image tower; LiT's locked image tower); their width must be embed_dim.
  image_projection: bool = True
  text_projection: bool = True
  temperature_init: float = SIGLIP_TEMPERATURE_INIT  # t; the logit scale is exp(t).
  bias_init: Optional[float] = SIGLIP_BIAS_INIT  # None: no bias (CLIP).
  # Token merging / pruning in the image tower (vitjax.models.token_merging), e.g.
  # dict(r=8): the same as image=dict(token_merging=...).
  token_merging: Any = None

  def __post_init__(self):
    object.__setattr__(self, "image", _freeze(self.image))
    object.__setattr__(self, "text", _freeze(self.text))
    object.__setattr__(self, "token_merging", token_merging_lib.freeze(self.token_merging))
    super().__post_init__()

  def _image_tower(self):
    options = dict(self.image)
    if self.token_merging is not None:
      options["token_merging"] = self.token_merging
    options["num_classes"] = self.embed_dim if self.image_projection else 0
    options.setdefault("head_zeroinit", False)  # A zero projection has no direction.
    return registry.create_model(self.image_model, **options)

  def _image_option(self, key, default):
    """An image-tower option without building the tower (a module cannot be built here)."""
    if key in self.image:
      return self.image[key]
    try:
      entry = registry.model_entry(self.image_model)
      defaults, module = entry.defaults, entry.module
    except registry.UnknownModelError:  # A family ('vit', 'deit', 'mixer'): the module's default.
      defaults, module = {}, vit.VisionTransformer
    return defaults.get(key, getattr(module, key, default))

  @property
  def image_size(self):
    return self._image_option("image_size", 224)

  @property
  def in_channels(self):
    return self._image_option("in_channels", 3)

  @property
  def max_length(self):
    return self.text.get("max_length", TextTransformer.max_length)

  def setup(self):
    self.img = self._image_tower()
    self.txt = TextTransformer(**{"num_classes": self.embed_dim if self.text_projection else 0,
                                  **self.text})
    self.t = self.param("t", nn.initializers.constant(self.temperature_init),
                        (1,), jnp.float32)
    if self.bias_init is not None:
      self.b = self.param("b", nn.initializers.constant(self.bias_init),
                          (1,), jnp.float32)

  def __call__(self, images=None, texts=None, train=False):
    if self.is_initializing():  # Create both towers' parameters whatever was passed.
      if images is None:
        size = self.image_size
        images = jnp.zeros((1, size, size, self.in_channels), jnp.float32)
      if texts is None:
        texts = jnp.zeros((1, self.max_length), jnp.int32)
    if images is None and texts is None:
      raise ValueError("TwoTowers needs images, texts or both; got neither.")
    out = {}
    if images is not None:
      out["img"], out["img/norm"] = self._encode(self.img, images, train, "img", out)
    if texts is not None:
      out["txt"], out["txt/norm"] = self._encode(self.txt, texts, train, "txt", out)
    out["t"] = jnp.exp(self.t[0])
    out["b"] = self.b[0] if self.bias_init is not None else jnp.zeros((), jnp.float32)
    if images is None or texts is None:
      return None, out
    logits = out["t"] * out["img"] @ out["txt"].T + out["b"]
    out["logits"] = logits
    return logits, out

  def _encode(self, tower, inputs, train, prefix, out):
    features, tower_out = tower(inputs, train=train)
    if features.shape[-1] != self.embed_dim:
      raise ValueError(f"The {prefix} tower's features are {features.shape[-1]} wide but "
                       f"embed_dim={self.embed_dim}: give it a projection "
                       f"({'image' if prefix == 'img' else 'text'}_projection=True) or set "
                       f"embed_dim={features.shape[-1]}.")
    flat = flax.traverse_util.flatten_dict(tower_out, sep="/")
    out.update({f"{prefix}/{name}": value for name, value in flat.items()})
    return l2_normalize(features)


def clip_options(image, text, embed_dim):
  """TwoTowers options of an OpenAI CLIP: quick_gelu, ln_pre, class token, causal EOS text."""
  return dict(
      image_model="vit", embed_dim=embed_dim, temperature_init=CLIP_TEMPERATURE_INIT,
      bias_init=None,
      image={"pool_type": "token", "activation": "quick_gelu", "embedding_norm": True,
             "layer_norm_eps": 1e-5, **image},
      text={"pool_type": "eos", "causal": True, "activation": "quick_gelu",
            "layer_norm_eps": 1e-5, **text})


def siglip_options(image, text, embed_dim):
  """TwoTowers options of a SigLIP: MAP-pooled image tower, last-token text with a head."""
  return dict(
      image_model="vit", embed_dim=embed_dim, image_projection=False,
      image={"pool_type": "map", "gelu_approximate": True, **image},
      text={"pool_type": "last", "gelu_approximate": True, **text})


def register_two_towers(register, *, clip_mean, clip_std, siglip_mean, siglip_std):
  """Registers CLIP and SigLIP sizes (published HF layouts) and toy sizes for CPU runs."""
  clip_paper = "Learning Transferable Visual Models From Natural Language Supervision " \
               "(Radford et al., 2021)"
  siglip_paper = "Sigmoid Loss for Language Image Pre-Training (Zhai et al., 2023)"
  clip_text = dict(vocab_size=49408, max_length=77, width=512, depth=12, mlp_dim=2048,
                   num_heads=8)
  for name, variant, resolution, text, embed_dim in (
      ("clip_vit_base_patch32", "B/32", 224, clip_text, 512),
      ("clip_vit_base_patch16", "B/16", 224, clip_text, 512),
      ("clip_vit_large_patch14", "L/14", 224,
       dict(clip_text, width=768, mlp_dim=3072, num_heads=12), 768),
      ("clip_vit_large_patch14_336", "L/14", 336,
       dict(clip_text, width=768, mlp_dim=3072, num_heads=12), 768)):
    register(name, TwoTowers, mean=clip_mean, std=clip_std, paper=clip_paper,
             **clip_options(_vit(variant, resolution), text, embed_dim))
  for name, variant, resolution, width, depth, mlp_dim, heads in (
      ("siglip_base_patch16_224", "B/16", 224, 768, 12, 3072, 12),
      ("siglip_base_patch16_256", "B/16", 256, 768, 12, 3072, 12),
      ("siglip_large_patch16_256", "L/16", 256, 1024, 24, 4096, 16)):
    text = dict(vocab_size=32000, max_length=64, width=width, depth=depth, mlp_dim=mlp_dim,
                num_heads=heads)
    register(name, TwoTowers, mean=siglip_mean, std=siglip_std, paper=siglip_paper,
             **siglip_options(_vit(variant, resolution), text, width))
  # Any towers, all options given (configs): e.g. configs/lit_digits.py.
  register("two_towers", TwoTowers, mean=siglip_mean, std=siglip_std)
  # Toy sizes for CPU runs (not from a paper): mu/4 towers over 16 px digits, byte tokens.
  toy_image = dict(_vit("mu/4", 16), pool_type="gap")
  toy_text = dict(vocab_size=259, max_length=32, width=64, depth=2, mlp_dim=256, num_heads=4)
  register("clip_mu", TwoTowers, mean=siglip_mean, std=siglip_std, paper=clip_paper,
           image=toy_image, text=dict(toy_text, pool_type="eos", eos_token_id=1, causal=True),
           embed_dim=64, temperature_init=CLIP_TEMPERATURE_INIT, bias_init=None)
  register("siglip_mu", TwoTowers, mean=siglip_mean, std=siglip_std, paper=siglip_paper,
           image=toy_image, text=dict(toy_text, pool_type="last"), embed_dim=64,
           image_projection=False)


def _vit(variant, resolution):
  return dict(vit.decode_variant(variant), image_size=resolution)
