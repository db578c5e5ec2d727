"""Parsing the augmentation language: `hflip(p=0.5) | rotate(limit=15) | resize(224, 224)`.

A spec is text, or the path of a YAML/JSON file holding either that text, a list of stages
(each a text stage or a mapping `{op: NAME, ARG: VALUE, ...}`), or a mapping
`{pipeline: <text or list>, keep_original: true|false}`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.augment import ops as _ops  # noqa: F401  (registers the ops)
from common.augment.registry import REQUIRED, lookup
from common.errors import SpecError

SPEC_FILE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class AugmentSpec:
    """A validated spec: normalised stages (every argument explicit) and keep_original."""

    stages: list[dict[str, Any]]
    keep_original: bool = False


def parse_spec(source: str) -> AugmentSpec:
    """Parse spec text or a spec file into normalised stages; SpecError on any fault."""
    text = source.strip()
    if text.endswith(SPEC_FILE_SUFFIXES):
        return parse_document(load_file(Path(text)))
    return AugmentSpec(parse_text(text))


def load_file(path: Path) -> Any:
    """The YAML/JSON content of a spec file."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read spec file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {path} is not valid YAML/JSON: {exc}") from exc


def parse_document(document: Any) -> AugmentSpec:
    """A loaded spec file to an AugmentSpec."""
    keep_original = False
    if isinstance(document, dict):
        unknown = set(document) - {"pipeline", "keep_original"}
        if unknown:
            raise SpecError(f"spec file: unknown key(s) {', '.join(sorted(unknown))}")
        keep_original = bool(document.get("keep_original", False))
        document = document.get("pipeline", [])
    if isinstance(document, str):
        return AugmentSpec(parse_text(document), keep_original)
    if not isinstance(document, list):
        raise SpecError("spec file must hold a pipeline string, a list of stages, or a mapping")
    stages = []
    for item in document:
        if isinstance(item, str):
            stages.extend(parse_text(item))
        elif isinstance(item, dict) and "op" in item:
            arguments = {key: value for key, value in item.items() if key != "op"}
            stages.append(normalise(str(item["op"]), [], arguments))
        else:
            raise SpecError(f"spec file: stage {item!r} is neither text nor a mapping with 'op'")
    return AugmentSpec(stages, keep_original)


def parse_text(text: str) -> list[dict[str, Any]]:
    """`op(args) | op(args)` to normalised stages."""
    if not text.strip():
        return []
    return [parse_stage(stage.strip()) for stage in text.split("|")]


def parse_stage(stage: str) -> dict[str, Any]:
    """One `name(positional, key=value)` stage; arguments must be literals."""
    if not stage:
        raise SpecError("empty stage between '|' separators")
    try:
        node = ast.parse(stage, mode="eval").body
    except SyntaxError as exc:
        raise SpecError(f"cannot parse stage {stage!r}: {exc.msg}") from exc
    if isinstance(node, ast.Name):
        return normalise(node.id, [], {})
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise SpecError(f"stage {stage!r} must look like name(arg, key=value)")
    name = node.func.id
    try:
        positional = [ast.literal_eval(argument) for argument in node.args]
        keywords = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
    except ValueError as exc:
        raise SpecError(f"{name}: arguments must be numbers, strings, booleans or pairs") from exc
    return normalise(name, positional, keywords)


def normalise(name: str, positional: list[Any], keywords: dict[str, Any]) -> dict[str, Any]:
    """Bind arguments to the op's params, check each, fill defaults: `{op, p, args}`."""
    op = lookup(name)
    probability = keywords.pop("p", 1.0)
    if isinstance(probability, bool) or not isinstance(probability, int | float) or not 0 <= probability <= 1:
        raise SpecError(f"{name}: argument 'p' must be a probability in [0, 1]; got {probability!r}")
    names = list(op.params)
    if len(positional) > len(names):
        raise SpecError(f"{name}: takes {len(names)} positional argument(s), got {len(positional)}")
    given = dict(zip(names, positional, strict=False))
    for key, value in keywords.items():
        if key not in op.params:
            raise SpecError(f"{name}: unknown argument '{key}'; it takes {', '.join(names) or 'none'}")
        if key in given:
            raise SpecError(f"{name}: argument '{key}' given twice")
        given[key] = value
    arguments = {}
    for key, param in op.params.items():
        if key not in given:
            if param.default is REQUIRED:
                raise SpecError(f"{name}: missing argument '{key}'")
            given[key] = param.default
        arguments[key] = param.check(name, key, given[key])
    return {"op": name, "p": float(probability), "args": arguments}


def format_spec(stages: list[dict[str, Any]]) -> str:
    """Normalised stages back to compact text (defaults included)."""
    parts = []
    for stage in stages:
        arguments = [f"{key}={value!r}" for key, value in stage["args"].items()]
        if stage["p"] != 1.0:
            arguments.append(f"p={stage['p']}")
        parts.append(f"{stage['op']}({', '.join(arguments)})")
    return " | ".join(parts)
