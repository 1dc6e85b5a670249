"""Experiment configs: `configs/FILE.py[:key=value,...]` plus `--config.key=value` overrides.

A config file defines `get_config(arg)` returning an `ml_collections.ConfigDict`.
`arg` is the text after the colon; `parse_arg` turns it into typed values:

    def get_config(arg=None):
      arg = config_lib.parse_arg(arg, variant='mu/4', steps=1000)
      ...

Configs are locked: setting a key they do not define is an error that suggests
the closest existing keys, so a typo never silently does nothing.
"""

import ast
import contextlib
import difflib
import importlib.util
import os

import ml_collections


class ConfigError(ValueError):
  """A config file, argument or override that cannot be used as given."""


def parse_arg(arg, **defaults):
  """'a=1,b=x' -> ConfigDict(a=1, b='x'), typed like `defaults`; unknown keys are errors.

  A bare word is a flag set to True: 'fast' -> fast=True.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"Unknown config argument {key!r}.{_suggest(key, defaults)} "
                        f"Arguments of this config: {', '.join(sorted(defaults)) or 'none'}.")
    result[key] = _parse_value(text if eq else "true", defaults[key], key)
  return result


def load_config(spec):
  """Loads 'path/to/file.py[:arg]' by calling its `get_config(arg)`; returns it locked."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"Config file {path!r} does not exist. Configs live in configs/, "
                      f"e.g. --config configs/quickstart.py.")
  module_spec = importlib.util.spec_from_file_location(
      "vitjax_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"Config file {path!r} defines no get_config(arg) function.")
  config = module.get_config(arg) if arg else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict.")
  config.lock()
  return config


def apply_overrides(config, overrides):
  """Applies 'key.sub=value' overrides (the `--config.` prefix already removed)."""
  for override in overrides:
    key, eq, text = override.partition("=")
    if not eq:
      raise ConfigError(f"Override {override!r} has no value; write --config.{key}=VALUE.")
    parent, leaf = _lookup_parent(config, key)
    current = parent[leaf]
    # A None default has no type to check against; ConfigDict needs unlocking to retype it.
    with parent.unlocked() if current is None else contextlib.nullcontext():
      parent[leaf] = _parse_value(text, current, key)
  return config


def flatten(config, prefix=""):
  """{'model.name': 'vit', ...}: every leaf key of a (nested) ConfigDict."""
  items = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      items.update(flatten(value, f"{prefix}{key}."))
    else:
      items[f"{prefix}{key}"] = value
  return items


def _lookup_parent(config, dotted_key):
  node = config
  parts = dotted_key.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"Unknown config key {dotted_key!r}."
                        f"{_suggest(dotted_key, flatten(config))} "
                        f"Keys are defined by the config file's get_config().")
    if depth == len(parts) - 1:
      return node, part
    node = node[part]
  raise AssertionError("unreachable")


def _parse_value(text, current, key):
  """Parses `text` into the type of the current value of `key`."""
  text = text.strip()
  if text.lower() == "none" and (current is None or isinstance(current, str)):
    return None  # `--config.init=None` means None, not the string 'None'.
  try:
    if isinstance(current, bool):
      lowered = text.lower()
      if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
      return lowered in ("true", "1", "yes")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      value = value if isinstance(value, (tuple, list)) else (value,)
      return type(current)(value)
    if current is None:
      try:
        return ast.literal_eval(text)
      except (ValueError, SyntaxError):
        return text
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"Config key {key!r} holds a {type(current).__name__} "
                      f"({current!r}); cannot parse {text!r} as one.") from e
  raise ConfigError(f"Config key {key!r} is a {type(current).__name__}; "
                    f"it cannot be set from the command line.")


def _suggest(key, candidates):
  close = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)
  if not close:
    # A misspelt leaf under the right parent: compare the last parts.
    leaf = key.rsplit(".", 1)[-1]
    close = [c for c in candidates if difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1]], cutoff=0.75)]
  return f" Did you mean {', '.join(repr(c) for c in close[:3])}?" if close else ""

