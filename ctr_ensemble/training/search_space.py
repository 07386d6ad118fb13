"""Search spaces of ``ctr-ensemble tune``: a YAML file with a ``model:`` and a ``train:`` section.

``model:`` keys are fields of the member's config dataclass (``ctr-ensemble models --json``), ``train:``
keys fields of ``TrainConfig``; an unknown key, a spec of the wrong shape or a value of the wrong type
is a ``CtrError`` naming the file and the key. Each key maps to a parameter spec or a fixed value::

    model:
      embedding_regularizer: {type: float, low: 1.0e-4, high: 0.1, log: true}
      net_regularizer: {type: float, low: 1.0e-5, high: 1.0e-2, log: true, zero: true}  # or exactly 0
      cross_layers: {type: int, low: 1, high: 4}                     # step: 1 unless given
      hidden: {type: categorical, choices: [[256, 128], [400, 400, 400]]}
      embedding_dim: 16                                              # fixed, not searched
    train:
      lr: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}
      batch_size: {type: categorical, choices: [256, 512, 1024, 2048]}

``zero: true`` (float, log scale) adds a switch ``<key>_zero``: the value is exactly 0 or log-uniform in
[low, high]. Categorical choices may be lists (hidden layer sizes): Optuna sees them as their JSON text.

The shipped spaces (package data, ``search_spaces/``): ``default.yaml`` for every member (less the model
keys a member's config does not have: ``lr`` has no ``hidden`` / ``dropout``), and ``<arch>.yaml`` with a
member's own keys (they add to or replace the default's); ``--space FILE`` is a whole space of its own
(nothing shipped is merged in), and it, like ``<arch>.yaml``, may name only keys the member has.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ctr_ensemble.errors import CtrError
from ctr_ensemble.training import run_config

SPACES_DIR = Path(__file__).with_name("search_spaces")
KINDS = ("float", "int", "categorical")
SPEC_KEYS = {"float": {"low", "high", "log", "step", "zero"}, "int": {"low", "high", "log", "step"},
             "categorical": {"choices"}}


@dataclass(frozen=True)
class Param:
    section: str  # model | train
    key: str
    kind: str  # float | int | categorical | fixed
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    zero: bool = False  # float: exactly 0 is one more candidate
    choices: tuple = ()
    value: object = None  # kind fixed

    def labels(self) -> list:
        """The categorical choices as Optuna stores them (JSON text when any choice is a list or a mapping)."""
        if any(isinstance(c, (list, dict)) for c in self.choices):
            return [json.dumps(c) for c in self.choices]
        return list(self.choices)

    def suggest(self, trial):
        """This parameter's value for ``trial`` (an Optuna trial, or a FixedTrial of stored params)."""
        if self.kind == "fixed":
            return copy.deepcopy(self.value)
        if self.kind == "float":
            if self.zero and trial.suggest_categorical(f"{self.key}_zero", [False, True]):
                return 0.0
            v = trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
            return round(v, 12) if self.step else v  # 0.35, not low + 7 * 0.05 = 0.35000000000000003
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        labels = self.labels()
        return copy.deepcopy(self.choices[labels.index(trial.suggest_categorical(self.key, labels))])

    def stored(self, value) -> dict | None:
        """``value`` as the Optuna params of this parameter (what ``suggest`` would read back), or None when it
        lies outside the space (then it cannot be enqueued)."""
        if self.kind == "fixed":
            return {}
        if self.kind == "categorical":
            labels = self.labels()
            label = json.dumps(value) if any(isinstance(c, (list, dict)) for c in self.choices) else value
            return {self.key: label} if label in labels else None
        if self.kind == "float" and self.zero and value == 0:
            return {f"{self.key}_zero": True}
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return None
        out = {self.key: float(value) if self.kind == "float" else int(value)}
        return {f"{self.key}_zero": False, **out} if self.zero else out

    def describe(self) -> dict:
        if self.kind == "fixed":
            return {"value": self.value}
        d = {"type": self.kind, "low": self.low, "high": self.high, "step": self.step, "log": self.log or None,
             "zero": self.zero or None, "choices": list(self.choices) or None}
        return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class SearchSpace:
    source: str  # the file(s) it was read from
    params: tuple[Param, ...]

    @property
    def searched(self) -> list[Param]:
        return [p for p in self.params if p.kind != "fixed"]

    def suggest(self, trial) -> tuple[dict, dict]:
        """(model config overrides, TrainConfig overrides) for ``trial``: searched and fixed values."""
        out: dict[str, dict] = {"model": {}, "train": {}}
        for p in self.params:
            out[p.section][p.key] = p.suggest(trial)
        return out["model"], out["train"]

    def stored(self, model: dict, train: dict) -> dict | None:
        """The Optuna params of the configuration ``model``/``train`` (dataclass fields as dicts), None if any
        searched value lies outside the space."""
        out = {}
        for p in self.searched:
            got = p.stored((model if p.section == "model" else train)[p.key])
            if got is None:
                return None
            out.update(got)
        return out

    def fixed(self) -> tuple[dict, dict]:
        """The fixed values only (the untuned baseline of ``tune --test`` keeps them)."""
        out: dict[str, dict] = {"model": {}, "train": {}}
        for p in self.params:
            if p.kind == "fixed":
                out[p.section][p.key] = copy.deepcopy(p.value)
        return out["model"], out["train"]

    def describe(self) -> dict:
        """The space as plain data (stored with the study: a resume must search the same space)."""
        out: dict[str, dict] = {"model": {}, "train": {}}
        for p in self.params:
            out[p.section][p.key] = p.describe()
        return out


def _number(v, where: str, integer: bool):
    v = run_config.coerce("int" if integer else "float", v)
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise CtrError(f"{where}: expected {'an integer' if integer else 'a number'}, got {v!r}")
    return v


def _param(section: str, key: str, spec, annotation: str, where: str) -> Param:
    if not isinstance(spec, dict):  # a fixed value
        value = run_config.coerce(annotation, spec)
        if not run_config.fits(annotation, value):
            raise CtrError(f"{where}: fixed value {spec!r} is not a {annotation}")
        return Param(section, key, "fixed", value=value)
    kind = spec.get("type")
    if kind not in KINDS:
        raise CtrError(f"{where}: `type` must be one of {', '.join(KINDS)} (or give a plain value to fix the key), "
                       f"got {kind!r}")
    extra = sorted(set(spec) - SPEC_KEYS[kind] - {"type"})
    if extra:
        raise CtrError(f"{where}: unknown spec key(s) {', '.join(extra)} for type {kind}; "
                       f"valid: type, {', '.join(sorted(SPEC_KEYS[kind]))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise CtrError(f"{where}: categorical needs a non-empty list `choices`")
        choices = [run_config.coerce(annotation, c) for c in choices]
        for c in choices:
            if not run_config.fits(annotation, c):
                raise CtrError(f"{where}: choice {c!r} is not a {annotation}")
        p = Param(section, key, kind, choices=tuple(choices))
        if len(set(map(str, p.labels()))) != len(choices):
            raise CtrError(f"{where}: choices repeat a value")
        return p
    if annotation not in ("float", "int") or (kind == "float" and annotation == "int"):
        raise CtrError(f"{where}: a {kind} range does not fit a field of type {annotation}"
                       + ("; use type: int" if annotation == "int" else "; use type: categorical"))
    integer = kind == "int"
    for k in ("low", "high"):
        if k not in spec:
            raise CtrError(f"{where}: {kind} needs `low` and `high`")
    low, high = _number(spec["low"], f"{where}: low", integer), _number(spec["high"], f"{where}: high", integer)
    step = _number(spec["step"], f"{where}: step", integer) if spec.get("step") is not None else None
    log, zero = spec.get("log", False), spec.get("zero", False)
    if not isinstance(log, bool) or not isinstance(zero, bool):
        raise CtrError(f"{where}: `log` and `zero` are true or false")
    if not low < high:
        raise CtrError(f"{where}: needs low < high, got low={low}, high={high}")
    if log and low <= 0:
        raise CtrError(f"{where}: a log scale needs low > 0, got {low}")
    if step is not None and (step <= 0 or (log and (kind == "float" or step != 1))):
        raise CtrError(f"{where}: step must be > 0 and cannot be combined with log (int: step 1 only)")
    if zero and not log:
        raise CtrError(f"{where}: `zero: true` goes with `log: true` (a linear range can include 0 itself)")
    return Param(section, key, kind, low=low, high=high, step=step, log=log, zero=zero)


def parse(obj, source: str, arch: str) -> dict[tuple[str, str], Param]:
    """The parameters of one loaded space file, checked against ``arch``'s config and ``TrainConfig``."""
    from ctr_ensemble import models
    from ctr_ensemble.training.config import TrainConfig

    if not isinstance(obj, dict):
        raise CtrError(f"{source}: expected a mapping with `model:` and `train:` sections, got {type(obj).__name__}")
    extra = sorted(set(obj) - set(run_config.SECTIONS))
    if extra:
        raise CtrError(f"{source}: unknown section(s) {', '.join(map(repr, extra))}; a search space has `model:` "
                       "(model config keys) and `train:` (TrainConfig keys)")
    out = {}
    for section, cls in (("model", models.entry(arch).config), ("train", TrainConfig)):
        specs = obj.get(section) or {}
        if not isinstance(specs, dict):
            raise CtrError(f"{source}: `{section}:` must be a mapping of keys to parameter specs")
        run_config.check_keys(cls, specs, f"{source}: {section}")
        types = run_config.field_types(cls)
        for key, spec in specs.items():
            out[section, key] = _param(section, key, spec, types[key], f"{source}: {section}.{key}")
    return out


def _member_keys_only(obj: dict, arch: str) -> dict:
    """The shipped default space without the model keys ``arch``'s config lacks (a member with no MLP tower)."""
    from ctr_ensemble import models

    names = {f.name for f in dataclasses.fields(models.entry(arch).config)}
    return {**obj, "model": {k: v for k, v in (obj.get("model") or {}).items() if k in names}}


def load(arch: str, path: Path | None = None) -> SearchSpace:
    """``path``'s space, or the shipped one of ``arch`` (default.yaml + <arch>.yaml if there is one)."""
    files = [path] if path is not None else [SPACES_DIR / "default.yaml"] + [
        p for p in [SPACES_DIR / f"{arch}.yaml"] if p.is_file()]
    params: dict[tuple[str, str], Param] = {}
    for f in files:
        obj = run_config.read_mapping(f)
        if path is None and f == SPACES_DIR / "default.yaml":
            obj = _member_keys_only(obj, arch)
        params.update(parse(obj, str(f), arch))
    source = " + ".join(str(f) for f in files)
    keys = [k for _, k in params]
    both = sorted({k for k in keys if keys.count(k) > 1})
    if both:
        raise CtrError(f"{source}: key(s) {', '.join(both)} in both `model:` and `train:`")
    if not any(p.kind != "fixed" for p in params.values()):
        raise CtrError(f"{source}: nothing to search (every key is fixed)")
    return SearchSpace(source, tuple(params.values()))
