"""Run config files: what ``train --config`` reads and ``tune`` writes (``best.yaml``).

Two layouts:

- flat (the original one): every top-level key is a model config override, e.g. ``hidden: [64]``;
- sectioned: ``model:`` (model config overrides) and/or ``train:`` (``TrainConfig`` fields: lr,
  batch_size, epochs, patience, ...), optionally ``arch:`` (the architecture the values are for;
  ``train --model`` must match it).

Keys are checked against the config dataclass's fields; an unknown key is an error naming the file,
the section and the key. Numbers that YAML 1.1 reads as strings (``1e-4`` without a dot) are taken
as numbers for numeric fields.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from ctr_ensemble.errors import CtrError
from ctr_ensemble.files import write_atomic

SECTIONS = ("model", "train")


def read_mapping(path: Path) -> dict:
    """A YAML file that must hold a mapping; a missing file, bad YAML or another type is a CtrError."""
    if not path.is_file():
        raise CtrError(f"{path}: config file not found")
    try:
        obj = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CtrError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(obj, dict):
        raise CtrError(f"{path}: expected a mapping of config keys, got {type(obj).__name__}")
    return obj


def field_types(cls) -> dict[str, str]:
    """Field name → its annotation as written (``int``, ``float``, ``list[int]``, ``str | None``, ...)."""
    return {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            for f in dataclasses.fields(cls)}


def check_keys(cls, keys, where: str) -> None:
    names = field_types(cls)
    unknown = [k for k in keys if k not in names]
    if unknown:
        raise CtrError(f"{where}: unknown {cls.__name__} key(s) {', '.join(map(repr, unknown))}; "
                       f"valid keys: {', '.join(sorted(names))}")


def coerce(annotation: str, value):
    """``value`` for a field of type ``annotation``: numeric strings become numbers (YAML's ``1e-4``)."""
    if isinstance(value, str) and annotation in ("float", "int"):
        try:
            return float(value) if annotation == "float" else int(value)
        except ValueError:
            return value
    if annotation == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def fits(annotation: str, value) -> bool:
    """Whether ``value`` has the field's type (the common annotations; anything else is accepted)."""
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in ("str", "str | None"):
        return isinstance(value, str) or (value is None and annotation != "str")
    if annotation.startswith("list[") and annotation.endswith("]"):
        return isinstance(value, list) and all(fits(annotation[5:-1], v) for v in value)
    return True


def checked(cls, values: dict, where: str) -> dict:
    """``values`` with known keys only (else a CtrError naming ``where`` and the key), coerced and type-checked."""
    check_keys(cls, values, where)
    types = field_types(cls)
    out = {}
    for k, v in values.items():
        out[k] = coerce(types[k], v)
        if not fits(types[k], out[k]):
            raise CtrError(f"{where}: {k}: expected {types[k]}, got {v!r}")
    return out


def sections(obj: dict, path: Path, arch: str) -> tuple[dict, dict]:
    """(model config overrides, TrainConfig overrides) of a loaded config file of either layout."""
    from ctr_ensemble import models
    from ctr_ensemble.training.config import TrainConfig

    if not set(SECTIONS) & set(obj):  # the flat layout: model keys only (make_config checks them)
        return dict(obj), {}
    extra = sorted(set(obj) - {*SECTIONS, "arch"})
    if extra:
        raise CtrError(f"{path}: with `model:`/`train:` sections the top level takes only model, train and arch; "
                       f"move {', '.join(map(repr, extra))} into a section")
    if obj.get("arch") not in (None, arch):
        raise CtrError(f"{path}: written for the architecture {obj['arch']!r}, not {arch!r} (--model)")
    out = []
    for name, cls in (("model", models.entry(arch).config), ("train", TrainConfig)):
        sec = obj.get(name) or {}
        if not isinstance(sec, dict):
            raise CtrError(f"{path}: `{name}:` must be a mapping of keys, got {type(sec).__name__}")
        out.append(checked(cls, sec, f"{path}: {name}"))
    return out[0], out[1]


def read(path: Path, arch: str) -> tuple[dict, dict]:
    """``train --config``: (model overrides, TrainConfig overrides) of the file at ``path``."""
    return sections(read_mapping(path), path, arch)


class _Dumper(yaml.SafeDumper):
    """Block mappings, lists on one line (``hidden: [256, 128]``)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def write(path: Path, arch: str, model: dict, train: dict, comment: str = "") -> Path:
    """A sectioned config file that ``train --config`` reads back (``comment`` lines go on top)."""
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    body = yaml.dump({"arch": arch, "model": model, "train": train}, Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False)
    write_atomic(path, (head + body).encode(), what="run config")
    return Path(path)
