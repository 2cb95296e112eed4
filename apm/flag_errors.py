"""Command-line mistakes as one paragraph: the flag that is wrong and the closest valid ones,
instead of a usage dump (for ``apm fit`` and the project's own tools alike)."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Iterable

from apm.errors import ConfigError


def flag_names(parser: argparse.ArgumentParser) -> list[str]:
    """The long option strings of ``parser`` (``--model.lr``, ``--images``, ...)."""
    return sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--")})


def _initials(name: str) -> str:
    return "".join(w[0] for w in re.split(r"[_-]+", name) if w)


def closest(flag: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` valid flags closest to ``flag``: within its group (``--model.*`` for
    ``--model.x``) an abbreviation by initials first (``learning_rate`` -> ``lr``), then difflib's
    closest; without a match in the group, difflib's closest among all."""
    valid = list(valid)
    name = flag.split("=", 1)[0]
    group, _, leaf = name.rpartition(".")
    same = [v for v in valid if group and v.startswith(group + ".")]
    leaves = {v.rpartition(".")[2]: v for v in same}
    found = [v for lf, v in leaves.items() if len(lf) > 1 and _initials(leaf) == lf or _initials(lf) == leaf]
    found += [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.5)]
    found = list(dict.fromkeys(found))[:n]
    return found or difflib.get_close_matches(name, valid, n=n, cutoff=0.6)


def flag_error(message: str, valid: Iterable[str], command: str) -> ConfigError:
    """A ConfigError of the parser's ``message``; for unrecognized flags, each with its closest
    valid names."""
    message = " ".join(message.split())
    unknown = re.search(r"unrecognized arguments?:\s*(.*)", message)
    if not unknown:
        return ConfigError(f"{command}: {message} (`{command} --help` lists the options).")
    valid = list(valid)
    parts = []
    for flag in (t for t in unknown.group(1).split() if t.startswith("-")):
        near = closest(flag, valid)
        parts.append(f"'{flag.split('=', 1)[0]}'" + (f" (did you mean {' or '.join(near)}?)" if near else ""))
    return ConfigError(f"{command}: unknown option {', '.join(parts)}. `{command} --help` lists the "
                       f"options.")


class Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as one ConfigError paragraph instead of usage and exit 2."""

    def error(self, message: str):  # type: ignore[override]
        raise flag_error(message, flag_names(self), self.prog)
