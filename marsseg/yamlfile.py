"""YAML files as people write them today: PyYAML's safe loader with YAML 1.2's numbers.

PyYAML implements YAML 1.1, where a float needs a dot: `lr: 3e-4` reads as the string "3e-4"
and the config check then refuses it, although YAML 1.2 (2009), JSON and every training script
write learning rates that way. `Loader` adds 1.2's exponent form (`3e-4`, `1E-5`, `2.5e+3`) to
the safe loader and changes nothing else: quoted numbers stay strings, `1e2` is a float (so an
integer field still refuses it), and PyYAML's other 1.1 readings are untouched. A resolver is
PyYAML's own extension point for this; a YAML 1.2 parser (ruamel.yaml) would be a second YAML
library for one rule.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from marsseg.errors import ConfigError


class Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads YAML 1.2 floats with an exponent and no dot, and
    refuses a key written twice in one mapping (YAML forbids it; PyYAML keeps the last value,
    so `batch_size: 8` further down a config would silently win over the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_seen: dict[tuple[str, str], yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # `<<` merges may override by design; complex keys are not config keys
            key = (key_node.tag, key_node.value)
            if key in first_seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key_node.value!r} given twice (first at line "
                    f"{first_seen[key].line + 1})",
                    key_node.start_mark,
                )
            first_seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """The document in `text`, read with `Loader`; syntax errors raise `yaml.YAMLError`."""
    return yaml.load(text, Loader=Loader)  # a SafeLoader: no arbitrary objects


def read_yaml_mapping(path: str | os.PathLike, what: str, empty_ok: bool = False) -> dict[str, Any]:
    """The top-level mapping of a YAML file (an empty file is an empty mapping if `empty_ok`).

    A syntax error or a top level that is not a mapping is one `ConfigError` line naming the
    file and `what` the mapping should hold; a missing file raises `OSError` for the caller's
    one-line report.
    """
    path = Path(path)
    try:
        values = parse_yaml(path.read_text())
    except yaml.MarkedYAMLError as err:  # a syntax error: say where, as an editor would
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join((err.problem or err.context or "syntax error").split())
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if values is None and empty_ok:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} at the top level")
    return values
