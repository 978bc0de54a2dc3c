"""An MPE2 env's exact state as plain data, and back: what exact resume needs, without pickle.

MPE2's raw env pickles by re-construction (EzPickle), which drops the world, and pickling the
objects themselves would make every checkpoint a program (unpickling runs code).  So the state
is read attribute by attribute into a tree of plain values — numbers, strings, lists, dicts,
tensors (numpy arrays become tensors), a numpy generator's state — and written back onto the
objects of a freshly built env of the same configuration.

The objects in question are those of MPE2 and of PettingZoo's wrappers (world, agents,
landmarks, entity states, actions, the agent selector, the wrapper chain).  One object may be
reachable along several paths (``world.landmarks[2]`` and ``world.agents[0].goal_b``), so each
gets a *home*: the first path that reaches it breadth-first, in attribute order, which runs
through the world's entity lists before any reference between entities.  An object is written
out at its home and as ``{"ref": home}`` elsewhere, and restored onto the live object found at
the same home, so references are re-pointed, never duplicated.  Rendering handles and the
(static) action and observation spaces are left out.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

_SKIP = {"screen", "game_font", "viewer", "renderOn", "_ezpickle_args", "_ezpickle_kwargs", "action_spaces",
         "observation_spaces"}  # rendering handles, constructor arguments, static spaces
_RNGS = {"PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"}  # numpy bit generators we rebuild
_SCALARS = {"float64", "float32", "int64", "int32", "bool"}  # numpy scalar types we rebuild
Path = tuple


def _is_object(v: Any) -> bool:
    mod = type(v).__module__
    return mod.startswith(("mpe2.", "pettingzoo.")) and hasattr(v, "__dict__")


def _skipped(name: str, v: Any) -> bool:
    return name in _SKIP or type(v).__module__.startswith("gymnasium.spaces")


def _children(v: Any):
    """(key, child) pairs of an object or a container, in a fixed order."""
    if _is_object(v):
        return [(k, c) for k, c in vars(v).items() if not _skipped(k, c)]
    if isinstance(v, (list, tuple)):
        return list(enumerate(v))
    if isinstance(v, dict):
        return list(v.items())
    return []


def homes(root: Any) -> dict[int, tuple[Path, Any]]:
    """id(object) → (its home path, the object): the first path reaching it, breadth-first."""
    out: dict[int, tuple[Path, Any]] = {id(root): ((), root)}
    queue = deque([(root, ())])
    while queue:
        v, path = queue.popleft()
        for k, c in _children(v):
            if _is_object(c):
                if id(c) in out:
                    continue  # reached again: a reference, not a new object
                out[id(c)] = (path + (k,), c)
            queue.append((c, path + (k,)))
    return out


# ----------------------------------------------------------------------------- out
def snapshot(root: Any) -> Any:
    """The state reachable from ``root`` (the outermost wrapper) as plain data."""
    home = {i: path for i, (path, _) in homes(root).items()}

    def enc(v: Any, path: Path) -> Any:
        if _is_object(v):
            if home[id(v)] != path:
                return {"ref": list(home[id(v)])}
            return {"obj": {k: enc(c, path + (k,)) for k, c in _children(v)}}
        if isinstance(v, np.ndarray):
            if v.dtype == object:
                raise TypeError(f"env attribute {'.'.join(map(str, path))} is an object array")
            return {"array": torch.from_numpy(v.copy())}
        if isinstance(v, np.generic):
            return {"scalar": [v.dtype.name, v.item()]}
        if isinstance(v, np.random.Generator):
            return {"rng": v.bit_generator.state}
        if isinstance(v, (list, tuple)):
            return {"list" if isinstance(v, list) else "tuple": [enc(c, path + (i,)) for i, c in enumerate(v)]}
        if isinstance(v, dict):
            return {"dict": [[k, enc(c, path + (k,))] for k, c in v.items()]}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(f"env attribute {'.'.join(map(str, path))} holds a {type(v).__name__}, which the "
                        "env state cannot record")

    return enc(root, ())


# ----------------------------------------------------------------------------- in
def restore(root: Any, data: Any) -> None:
    """Write a :func:`snapshot` back onto the env rooted at ``root`` (same scenario and config).

    Raises ValueError when ``data`` is not a snapshot of such an env.
    """
    live = dict(homes(root).values())  # home path → live object

    def dec(d: Any, path: Path) -> Any:
        if d is None or isinstance(d, (bool, int, float, str)):
            return d
        if not isinstance(d, dict) or len(d) != 1:
            raise ValueError(f"env state at {'.'.join(map(str, path)) or 'root'} is malformed")
        (tag, x), = d.items()
        if tag == "ref":
            return _live(live, tuple(x))
        if tag == "obj":
            obj = _live(live, path)
            for k, c in x.items():
                setattr(obj, k, dec(c, path + (k,)))
            return obj
        if tag == "array" and isinstance(x, torch.Tensor):
            return x.numpy().copy()
        if tag == "scalar" and x[0] in _SCALARS:
            return np.dtype(x[0]).type(x[1])
        if tag == "rng" and isinstance(x, dict) and x.get("bit_generator") in _RNGS:
            gen = np.random.Generator(getattr(np.random, x["bit_generator"])())
            gen.bit_generator.state = x
            return gen
        if tag in ("list", "tuple") and isinstance(x, list):
            out = [dec(c, path + (i,)) for i, c in enumerate(x)]
            return out if tag == "list" else tuple(out)
        if tag == "dict" and isinstance(x, list):
            return {k: dec(c, path + (k,)) for k, c in x}
        raise ValueError(f"env state at {'.'.join(map(str, path)) or 'root'} has an unknown entry {tag!r}")

    try:
        dec(data, ())
    except (TypeError, KeyError, IndexError) as e:
        raise ValueError(f"env state does not fit this env: {e}") from e


def _live(live: dict[Path, Any], path: Path) -> Any:
    if path not in live:
        raise ValueError(f"env state names an object at {'.'.join(map(str, path))} this env does not have")
    return live[path]
