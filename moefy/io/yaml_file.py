"""YAML files a user hands moefy (recipes, manifests, prompt lists), read with a bound on what they expand to.

`yaml.safe_load` runs no code, but anchors and aliases let a few hundred bytes stand for billions of nodes
(the "billion laughs"): harmless while shared, fatal once validated or copied. The node graph is sized first,
each aliased node counted as often as it is used (memoised, so the count itself stays cheap).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moefy.errors import BadInput

MAX_NODES = 100_000  # far beyond any recipe or manifest; an alias bomb is billions


def load_yaml(path: Path, what: str):
    """The parsed document of `path` (`what` names it in errors: "recipe", "manifest", ...)."""
    try:
        text = Path(path).read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded(node, {}) > MAX_NODES:
            raise BadInput(f"{what} {path} expands to more than {MAX_NODES:,} YAML nodes through its anchors and "
                           f"aliases; moefy refuses it. Write the values out, or use fewer aliases.")
        return yaml.safe_load(text)
    except FileNotFoundError:
        raise BadInput(f"{what} {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise BadInput(f"{what} {path} could not be read as YAML ({' '.join(str(exc).split())[:200]}).") from None


def _expanded(node: yaml.Node, sizes: dict[int, int]) -> int:
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # a cycle (a recursive alias) counts once per level
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded(k, sizes) + _expanded(v, sizes) for k, v in node.value)
    else:
        total = 1
    sizes[id(node)] = min(total, MAX_NODES + 1)
    return sizes[id(node)]
