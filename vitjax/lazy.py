"""Name -> 'module:attribute' tables whose modules are imported on first use."""

import difflib
import importlib


def resolve(table, name, kind, hint):
  """Imports and returns `table[name]`; an unknown name raises ValueError with the closest ones.

  `kind` names what is looked up ('task'); `hint` says how to pick one ('Set config.task to').
  """
  if name not in table:
    close = difflib.get_close_matches(str(name), table, 3)
    did_you_mean = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"Unknown {kind} {name!r}.{did_you_mean} {hint} one of: "
                     f"{', '.join(sorted(table))}.")
  module_name, attribute = table[name].split(":")
  return getattr(importlib.import_module(module_name), attribute)
