"""Weights in and out: big_vision/AugReg .npz, timm and HF transformers state dicts."""


def load_weights(*args, **kwargs):
  raise NotImplementedError


def save_weights(*args, **kwargs):
  raise NotImplementedError
