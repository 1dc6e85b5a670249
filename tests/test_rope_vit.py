"""RoPE ViTs load their published weights: naver-ai/rope-vit state dicts and timm's eva.py names.

The oracle is an independent PyTorch forward pass written from the authors' code
(deit/models_v2_rope.py): DeiT-III blocks with LayerScale `gamma_1`/`gamma_2`, a fused
`qkv`, and 2-D RoPE applied through a complex view of consecutive channel pairs to every
token but the class token; RoPE-Mixed learns `freqs` (2, depth, heads * head_dim / 2) for
x and y, RoPE-Axial uses fixed frequencies, theta 100, x on the first half of the pairs.
"""

import math

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vitjax
from vitjax.convert.checkpoint import CheckpointMismatchError

IMAGE, PATCH, WIDTH, DEPTH, HEADS, CLASSES = 32, 8, 64, 2, 4, 10
HEAD_DIM = WIDTH // HEADS


def _positions(grid_w, grid_h):
  t = torch.arange(grid_w * grid_h, dtype=torch.float32)
  return t % grid_w, torch.div(t, grid_w, rounding_mode="floor")  # t_x, t_y


def _mixed_init(generator):
  """Random per-head directions with the axial magnitudes, theta 10, as the authors init them."""
  magnitude = 1.0 / 10.0 ** (torch.arange(0, HEAD_DIM, 4).float() / HEAD_DIM)
  angles = torch.rand(DEPTH, HEADS, 1, generator=generator) * 2 * math.pi
  fx = torch.cat([magnitude * torch.cos(angles), magnitude * torch.cos(angles + math.pi / 2)], -1)
  fy = torch.cat([magnitude * torch.sin(angles), magnitude * torch.sin(angles + math.pi / 2)], -1)
  return torch.stack([fx, fy]).reshape(2, DEPTH, -1)  # The published layout.


class NaverRopeViT(torch.nn.Module):
  """rope_vit_models at a tiny size: patch embed, class token, RoPE blocks, norm, head."""

  def __init__(self, mixed, ape, generator):
    super().__init__()
    self.mixed, self.ape = mixed, ape
    self.patch_embed = torch.nn.Module()
    self.patch_embed.proj = torch.nn.Conv2d(3, WIDTH, PATCH, stride=PATCH)
    self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, WIDTH))
    if ape:  # Patches only: the class token has no absolute position.
      self.pos_embed = torch.nn.Parameter(torch.zeros(1, (IMAGE // PATCH) ** 2, WIDTH))
    self.blocks = torch.nn.ModuleList()
    for _ in range(DEPTH):
      block = torch.nn.Module()
      block.norm1 = torch.nn.LayerNorm(WIDTH, eps=1e-6)
      block.attn = torch.nn.Module()
      block.attn.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
      block.attn.proj = torch.nn.Linear(WIDTH, WIDTH)
      block.gamma_1 = torch.nn.Parameter(torch.ones(WIDTH))
      block.norm2 = torch.nn.LayerNorm(WIDTH, eps=1e-6)
      block.mlp = torch.nn.Module()
      block.mlp.fc1 = torch.nn.Linear(WIDTH, 4 * WIDTH)
      block.mlp.fc2 = torch.nn.Linear(4 * WIDTH, WIDTH)
      block.gamma_2 = torch.nn.Parameter(torch.ones(WIDTH))
      self.blocks.append(block)
    self.norm = torch.nn.LayerNorm(WIDTH, eps=1e-6)
    self.head = torch.nn.Linear(WIDTH, CLASSES)
    with torch.no_grad():  # Random everything, so that every tensor matters to the logits.
      for p in self.parameters():
        p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    if mixed:
      self.freqs = torch.nn.Parameter(_mixed_init(generator))
      t_x, t_y = _positions(IMAGE // PATCH, IMAGE // PATCH)
      self.register_buffer("freqs_t_x", t_x)  # Saved in the authors' state dicts.
      self.register_buffer("freqs_t_y", t_y)

  def _rotations(self, grid_w, grid_h):
    """Unit complex numbers: (tokens, pairs), or per block and head for mixed."""
    t_x, t_y = _positions(grid_w, grid_h)
    if self.mixed:
      angles = (t_x[:, None] * self.freqs[0][:, None] + t_y[:, None] * self.freqs[1][:, None])
      angles = angles.view(DEPTH, len(t_x), HEADS, -1).permute(0, 2, 1, 3)
      return torch.polar(torch.ones_like(angles), angles)
    bands = 1.0 / 100.0 ** (torch.arange(0, HEAD_DIM, 4).float() / HEAD_DIM)
    angles = torch.cat([torch.outer(t_x, bands), torch.outer(t_y, bands)], -1)
    return torch.polar(torch.ones_like(angles), angles)

  def _attention(self, attn, x, rotation):
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    rotate = lambda t: torch.view_as_real(
        torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2)) * rotation).flatten(3)
    q = torch.cat([q[:, :, :1], rotate(q[:, :, 1:])], 2)
    k = torch.cat([k[:, :, :1], rotate(k[:, :, 1:])], 2)
    weights = ((q * HEAD_DIM ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))

  def forward(self, images):
    x = self.patch_embed.proj(images)
    grid_h, grid_w = x.shape[2:]
    x = x.flatten(2).transpose(1, 2)
    if self.ape:
      side = IMAGE // PATCH
      pos_embed = self.pos_embed
      if (grid_h, grid_w) != (side, side):
        pos_embed = torch.nn.functional.interpolate(
            pos_embed.reshape(1, side, side, WIDTH).permute(0, 3, 1, 2), size=(grid_h, grid_w),
            mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
      x = x + pos_embed
    x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
    rotations = self._rotations(grid_w, grid_h)
    for i, block in enumerate(self.blocks):
      rotation = rotations[i] if self.mixed else rotations
      x = x + block.gamma_1 * self._attention(block.attn, block.norm1(x), rotation)
      x = x + block.gamma_2 * block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(block.norm2(x))))
    return self.head(self.norm(x)[:, 0])


def _timm_names(state_dict):
  """The names of timm's eva.py port: `rope.freqs` (2, depth, heads, head_dim/2), no buffers."""
  state_dict = {k: v for k, v in state_dict.items() if not k.startswith("freqs_t_")}
  if "freqs" in state_dict:
    state_dict["rope.freqs"] = state_dict.pop("freqs").reshape(2, DEPTH, HEADS, -1)
  return state_dict


def _model(rope, ape, **overrides):
  name = f"rope_{rope}{'_ape' if ape else ''}_deit_small_patch16_224"
  return vitjax.create_model(name, image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=DEPTH,
                             num_heads=HEADS, mlp_dim=4 * WIDTH, num_classes=CLASSES, **overrides)


@pytest.fixture(scope="module", params=[("mixed", False), ("axial", False), ("mixed", True)],
                ids=["mixed", "axial", "mixed_ape"])
def published(request, tmp_path_factory):
  rope, ape = request.param
  torch_model = NaverRopeViT(rope == "mixed", ape, torch.Generator().manual_seed(0)).eval()
  path = tmp_path_factory.mktemp("rope") / f"{rope}_{ape}.safetensors"
  save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, str(path))
  return rope, ape, torch_model, path


def _logits(torch_model, model, params, size):
  images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  got, _ = model.apply({"params": params}, images)
  return np.asarray(got), expected


def test_naver_checkpoint_matches_the_authors_forward_pass_at_two_resolutions(published):
  rope, ape, torch_model, path = published
  model = _model(rope, ape)
  params = vitjax.load_weights(model, path)
  # RoPE's point: the same weights at another resolution (the '_ape' variant's learned
  # embeddings resized as naver's F.interpolate does: posemb_resize='bicubic_no_antialias').
  for size in (IMAGE, 48):
    got, expected = _logits(torch_model, model, params, size)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=f"{size} px")


def test_timm_eva_names_load_to_the_same_parameters(published):
  rope, ape, _, path = published
  timm_path = path.with_name("timm_" + path.name)
  save_file(_timm_names(load_file(str(path))), str(timm_path))
  model = _model(rope, ape, scan_layers=True)  # Into big_vision's stacked layout, too.
  from_timm = vitjax.load_weights(model, timm_path)
  from_naver = vitjax.load_weights(model, path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_timm, from_naver)


def test_mixed_checkpoint_into_an_axial_model_says_which_rope(tmp_path):
  torch_model = NaverRopeViT(True, False, torch.Generator().manual_seed(1))
  save_file(dict(torch_model.state_dict()), str(tmp_path / "mixed.safetensors"))
  with pytest.raises(CheckpointMismatchError, match="rope='mixed'"):
    vitjax.load_weights(_model("axial", False), tmp_path / "mixed.safetensors")


def test_registered_sizes_have_the_published_parameter_counts():
  # timm's table for the naver_in1k weights (millions).
  published = {"vit_small_patch16_rope_224": 21.98, "vit_small_patch16_rope_mixed_224": 21.99,
               "rope_mixed_deit_base_patch16_224": 86.44}
  for name, millions in published.items():
    params = vitjax.models.param_shapes(vitjax.create_model(name))
    assert round(vitjax.models.count_params(params) / 1e6, 2) == millions, name
