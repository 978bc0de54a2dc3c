"""Command-line flags generated from the config dataclasses, shared by train/eval/profile/sweep.

Every field is a flag ``--<section>.<field>`` (dashes or underscores), its help text the field's
docstring; the common ones have short aliases (``--steps``, ``--seed``, ``--device``, ...).  Only
flags the user gave override the preset, so ``--preset cpu --seed 3`` means the cpu preset with
seed 3; the preset is the one for the scenario asked for (``config.SCENARIO_TUNING``).  Unknown
flags are refused with the closest valid names.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import sys
from dataclasses import fields, replace
from typing import Any, Sequence

from .config import PRESETS, SECTION_TYPES, Config, is_derived, preset, with_fields

# short alias → (section, field)
ALIASES = {
    "steps": ("run", "steps"),
    "seed": ("train", "seed"),
    "device": ("run", "device"),
    "backend": ("run", "backend"),
    "kernels": ("run", "kernels"),
    "amp": ("run", "amp"),
    "threads": ("run", "threads"),
    "scenario": ("env", "scenario"),
    "env": ("env", "scenario"),
    "max-cycles": ("env", "max_cycles"),
    "checkpoint-every": ("run", "checkpoint_every"),
    "eval-every": ("run", "eval_every"),
    "eval-episodes": ("run", "eval_episodes"),
    "log-every": ("run", "log_every"),
}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)  # type: ignore[union-attr]
    return docs


class Parser(argparse.ArgumentParser):
    """argparse that answers a bad flag with the valid ones closest to it.

    The usage line stays short (the config has dozens of flags; ``--help`` lists them all).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("usage", "%(prog)s [options]   (see --help)")
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()
            flags = [s for a in self._actions for s in a.option_strings]
            hints = []
            for b in bad:
                if b.startswith("-"):
                    close = difflib.get_close_matches(b.split("=")[0], flags, n=3, cutoff=0.5)
                    hints.append(f"{b}: did you mean {', '.join(close)}?" if close else f"{b}: no such flag")
            message += ("\n" + "\n".join(hints) if hints else "") + f"\nsee {self.prog} --help for all flags"
        super().error(message)


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{s!r} is not a boolean; use true or false")


def _type_of(default: Any):
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """Add --preset, the aliases, --scenario-arg and one flag per config field (default: unset)."""
    p.add_argument("--preset", default=None,
                   help=f"named preset: {', '.join(PRESETS)} (default paper), tuned for the scenario")
    p.add_argument("--scenario-arg", "--env-arg", dest="scenario_args", action="append", default=[],
                   metavar="KEY=VALUE", help="a scenario parameter, e.g. num_good=2 (repeatable)")
    base = Config()
    taken = set()
    for alias, (sec, name) in ALIASES.items():
        default = getattr(getattr(base, sec), name)
        doc = field_docs(SECTION_TYPES[sec]).get(name, "")
        p.add_argument(f"--{alias}", dest=f"{sec}.{name}", type=_type_of(default), default=None,
                       help=f"{doc} (= --{sec}.{name})")
        taken.add(f"{sec}.{name}")
    for sec, cls in SECTION_TYPES.items():
        docs = field_docs(cls)
        g = p.add_argument_group(f"{sec} ({cls.__name__})")
        for f in fields(cls):
            if f.name == "kwargs" or is_derived(f):  # kwargs: --scenario-arg; derived: resolve() fills it
                continue
            default = getattr(getattr(base, sec), f.name)
            flags = [f"--{sec}.{f.name.replace('_', '-')}"]
            if "_" in f.name:
                flags.append(f"--{sec}.{f.name}")
            g.add_argument(*flags, dest=f"{sec}.{f.name}", type=_type_of(default), default=None,
                           help=f"{docs.get(f.name, '')} [paper: {default}]")


def overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user set, as {"section.field": value}."""
    return {k: v for k, v in vars(ns).items() if "." in k and v is not None}


def apply_overrides(cfg: Config, over: dict[str, Any], scenario_args: Sequence[str] = ()) -> Config:
    from .env import parse_kwargs

    cfg = with_fields(cfg, over)
    if scenario_args:
        kwargs = dict(cfg.env.kwargs)
        kwargs.update(parse_kwargs(cfg.env.scenario, list(scenario_args)))
        cfg = replace(cfg, env=replace(cfg.env, kwargs=tuple(sorted(kwargs.items()))))
    elif "env.scenario" in over:
        from .env import scenario_params

        scenario_params(cfg.env.scenario)  # unknown scenario → clear error now
    return cfg


def config_from_args(ns: argparse.Namespace) -> Config:
    """Preset (for the scenario asked for), then the user's overrides."""
    return config_from(ns.preset or "paper", overrides(ns), ns.scenario_args)


def config_from(preset_name: str, over: dict[str, Any], scenario_args: Sequence[str] = ()) -> Config:
    """The preset for the scenario ``over`` names (its tuning included), then ``over`` itself."""
    return apply_overrides(preset(preset_name, over.get("env.scenario")), over, scenario_args)


def describe(cfg: Config) -> str:
    """The config, one ``section.field = value`` per line."""
    lines = [f"preset = {cfg.preset}"]
    for sec in SECTION_TYPES:
        for k, v in dataclasses.asdict(getattr(cfg, sec)).items():
            lines.append(f"{sec}.{k} = {v}")
    return "\n".join(lines)


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)
