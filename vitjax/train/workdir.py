"""A run's workdir: its paths (local or `gs://...`, through etils.epath) and its lock.

A workdir belongs to one run at a time. `lock(workdir)` creates `workdir/run.lock`
holding the run's host, pid and start time; a second run on the same workdir stops
with `WorkdirLockedError` (exit 2) before it touches anything. A lock left by a
process that died on this host is taken over with a warning. In a multi-host run
process 0 holds the lock for all hosts.
"""

import datetime
import json
import os
import socket
import sys

from etils import epath

LOCK_NAME = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def as_path(workdir):
  """`workdir` as an epath.Path: never `os.path`, which would turn `gs://b/x` into `./gs:/b/x`."""
  return workdir if isinstance(workdir, epath.Path) else epath.Path(workdir)


def is_local(path):
  """Whether `path` is on this machine's file system (not `gs://`, `s3://`, ...)."""
  return "://" not in os.fspath(path)


def _process_start_ticks(pid):
  """The process's start time in clock ticks since boot (Linux), or None.

  With the pid it identifies a process: a pid reused by another process after a
  crash has another start time.
  """
  try:
    with open(f"/proc/{pid}/stat") as f:
      # The command name (field 2) may hold spaces; the fields after it do not.
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _alive(holder):
  """Whether the lock's holder still runs; only decidable on its own host."""
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Exists, owned by another user.
  ticks = holder.get("start_ticks")
  return ticks is None or _process_start_ticks(pid) in (None, ticks)


def _describe(holder):
  return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started "
          f"{holder.get('started')} ({holder.get('command', '?')})")


def _read_holder(path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}  # Being written this instant, or damaged: treated as held.


def _create_exclusive(path, text):
  """Creates `path` with `text` unless it exists; True if this call created it."""
  if is_local(path):
    try:
      fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True
  # Object stores have no exclusive create: two runs started in the same second can
  # both pass this check. Good enough for the usual mistake (a second launch later).
  if path.exists():
    return False
  path.write_text(text)
  return True


def check_free(workdir):
  """Raises `WorkdirLockedError` if a live run holds `workdir`; reads only.

  The command line calls it first, so a second run stops at once, before the
  seconds it takes to import JAX and check the config; `acquire` decides.
  """
  path = as_path(workdir) / LOCK_NAME
  try:
    holder = json.loads(path.read_text())
  except (OSError, ValueError):
    return
  if holder.get("host") != socket.gethostname() or _alive(holder):
    raise _locked_error(as_path(workdir), path, holder)


def _locked_error(workdir, path, holder):
  return WorkdirLockedError(
      f"The workdir {workdir} is in use by another run ({_describe(holder)}); a workdir "
      f"holds one run at a time. Wait for that run to end, or use another --workdir. "
      f"If that run is dead (e.g. on another host), delete {path} and rerun.")


def acquire(workdir):
  """Takes the workdir's lock (creating the workdir); returns the lock file's path.

  Raises `WorkdirLockedError` naming the workdir and the holder if another run
  holds it. A lock whose holder died on this host is taken over with a warning.
  """
  workdir = as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_NAME
  me = {"host": socket.gethostname(), "pid": os.getpid(),
        "start_ticks": _process_start_ticks(os.getpid()),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(getattr(sys, "orig_argv", sys.argv))[:500]}
  text = json.dumps(me, indent=2) + "\n"
  for _ in range(3):
    if _create_exclusive(path, text):
      return path
    holder = _read_holder(path)
    if holder.get("host") != me["host"] or _alive(holder):
      raise _locked_error(workdir, path, holder)
    # Dead holder on this host: move its lock away first (a rename succeeds for one of
    # two runs taking it over at once), then create ours.
    stale = path.parent / f"{LOCK_NAME}.stale.{os.getpid()}"
    try:
      path.rename(stale)
    except (FileNotFoundError, OSError):
      continue  # Another run moved it first; try to create ours again.
    stale.unlink(missing_ok=True)
    print(f"WARNING: took over the lock of a run that is no longer running "
          f"({_describe(holder)}) in {workdir}.", file=sys.stderr, flush=True)
  raise WorkdirLockedError(f"Could not take the lock {path}; another run is taking over "
                           f"the same workdir. Use another --workdir.")


def release(path):
  """Removes the lock at `path` if this process still holds it."""
  holder = _read_holder(path)
  if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
    path.unlink(missing_ok=True)
