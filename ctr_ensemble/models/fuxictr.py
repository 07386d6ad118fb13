"""FuxiCTR / BARS model configs → our member config and training settings, one key to one field.

A BARS experiment (``reczoo/BARS``, ``model_config.yaml``) such as::

    DeepFM_frappe_x1_001_4ae3a56e:
      model: DeepFM
      embedding_dim: 10
      hidden_units: [400, 400, 400]
      net_dropout: 0.2
      batch_norm: True
      embedding_regularizer: 0.05
      net_regularizer: 0
      learning_rate: 1.e-3
      batch_size: 4096
      epochs: 100
      early_stop_patience: 2

maps to ``--model deepfm`` with ``embedding_dim=10, hidden=[400, 400, 400], dropout=0.2, batch_norm=true,
embedding_regularizer=0.05`` and ``TrainConfig(lr=1e-3, batch_size=4096, epochs=100, patience=2)``. A key we
cannot honour (another optimizer, a stacked DCNv2, a low-rank mixture, another activation) is an error that
names it, never silently dropped; keys that only steer FuxiCTR's bookkeeping (paths, GPU id, logging) are
ignored, listed in ``IGNORED``.
"""

from __future__ import annotations

import re

from ctr_ensemble.errors import CtrError

ARCHS = {"DeepFM": "deepfm", "DCN": "dcn", "DCNv2": "dcnv2", "PNN": "pnn", "IPNN": "pnn", "FiBiNET": "fibinet",
         "DHEN": "dhen", "InterFormer": "interformer"}
IGNORED = {"model_id", "model_root", "dataset_id", "gpu", "debug", "debug_mode", "verbose", "metrics", "monitor",
           "monitor_mode", "task", "loss", "every_x_epochs", "eval_interval", "eval_steps", "save_best_only", "shuffle",
           "num_workers", "version", "feature_specs", "feature_config", "group_id", "partition_block_size",
           "pickle_feature_encoder", "use_features", "ordered_features", "model"}
# FuxiCTR key → (our member config field, converter)
MODEL_KEYS = {
    "embedding_dim": ("embedding_dim", int),
    "hidden_units": ("hidden", list),
    "dnn_hidden_units": ("hidden", list),
    "parallel_dnn_hidden_units": ("hidden", list),
    "net_dropout": ("dropout", float),
    "dnn_dropout": ("dropout", float),
    "batch_norm": ("batch_norm", bool),
    "num_cross_layers": ("cross_layers", int),
    "crossing_layers": ("cross_layers", int),
    "reduction_ratio": ("reduction_ratio", int),
    "bilinear_type": ("bilinear_type", str),
    "low_rank": ("low_rank", int),
}
TRAIN_KEYS = {
    "learning_rate": ("lr", float),
    "batch_size": ("batch_size", int),
    "epochs": ("epochs", int),
    "early_stop_patience": ("patience", int),
    "patience": ("patience", int),
    "seed": ("seed", int),
}
# FuxiCTR keys with values we support only in one setting: key → (accepted values, why)
FIXED = {
    "optimizer": ({"adam"}, "our trainers use Adam"),
    "hidden_activations": ({"relu"}, "our MLP towers use ReLU"),
    "dnn_activations": ({"relu"}, "our MLP towers use ReLU"),
    "model_structure": ({"parallel"}, "our DCNv2 is the parallel structure"),
    "use_low_rank_mixture": ({False}, "our DCNv2 has no low-rank mixture of experts (low_rank is a plain factorisation)"),
    "loss": ({"binary_crossentropy"}, "our trainers minimise binary cross-entropy"),
}
_REG = re.compile(r"^\s*(l1|l2)\s*\(\s*([-+0-9.eE]+)\s*\)\s*$")


def parse_regularizer(value) -> tuple[float, int]:
    """FuxiCTR's regularizer value → (λ, p): a number is l2(λ); "l2(1e-5)" / "l1(1e-5)" name the norm."""
    if isinstance(value, bool):
        raise CtrError(f"regularizer must be a number or 'l1(x)'/'l2(x)', got {value!r}")
    if isinstance(value, (int, float)):
        return float(value), 2
    if isinstance(value, str):
        m = _REG.match(value)
        if m:
            return float(m.group(2)), 1 if m.group(1) == "l1" else 2
        try:
            return float(value), 2
        except ValueError:
            pass
    raise CtrError(f"regularizer must be a number or 'l1(x)'/'l2(x)' (one norm per regularizer), got {value!r}")


def _yaml_value(v):
    """BARS dumps values as strings ('0.05', '[400, 400, 400]', 'True'): read them back as YAML."""
    if isinstance(v, str):
        import yaml

        try:
            return yaml.safe_load(v)
        except yaml.YAMLError:
            return v
    return v


def experiment(doc: dict, exp_id: str | None = None) -> dict:
    """One experiment's flat config from a FuxiCTR YAML document: the document itself when it has ``model``, else
    the entry ``exp_id`` (or the only entry)."""
    if "model" in doc and not isinstance(doc["model"], dict):
        return doc
    entries = {k: v for k, v in doc.items() if isinstance(v, dict) and "model" in v}
    if exp_id is not None:
        if exp_id not in entries:
            raise CtrError(f"experiment {exp_id!r} not in the FuxiCTR config (has: {', '.join(entries) or 'none'})")
        return entries[exp_id]
    if len(entries) != 1:
        raise CtrError(f"the FuxiCTR config has {len(entries)} experiments ({', '.join(entries)}); pick one with "
                       "--fuxictr-exp-id" if entries else "no FuxiCTR experiment (a mapping with a 'model' key) found")
    return next(iter(entries.values()))


def from_fuxictr(cfg: dict) -> tuple[str, dict, dict]:
    """A flat FuxiCTR model config → (our architecture, member config overrides, TrainConfig overrides)."""
    cfg = {k: _yaml_value(v) for k, v in cfg.items()}
    name = cfg.get("model")
    if name not in ARCHS:
        raise CtrError(f"FuxiCTR model {name!r} has no member here; supported: {', '.join(sorted(ARCHS))}")
    model, train, unknown = {}, {}, []
    for key, value in cfg.items():
        if key in IGNORED:
            continue
        if key in FIXED:
            allowed, why = FIXED[key]
            v = value.lower() if isinstance(value, str) else value
            if v not in allowed:
                raise CtrError(f"FuxiCTR {key}: {value!r} is not supported ({why})")
        elif key in ("embedding_regularizer", "net_regularizer"):
            lam, p = parse_regularizer(value if value is not None else 0.0)
            model[key], model[f"{key}_p"] = lam, p
        elif key == "reduce_lr_on_plateau":
            train["plateau_factor"] = 0.1 if value else 1.0
        elif key in MODEL_KEYS:
            field, conv = MODEL_KEYS[key]
            model[field] = [int(h) for h in value] if conv is list else conv(value)
        elif key in TRAIN_KEYS:
            field, conv = TRAIN_KEYS[key]
            train[field] = conv(value)
        else:
            unknown.append(key)
    if unknown:
        raise CtrError(f"FuxiCTR keys with no counterpart here: {', '.join(sorted(unknown))} "
                       f"(model keys: {', '.join(sorted(MODEL_KEYS))}; training keys: {', '.join(sorted(TRAIN_KEYS))})")
    return ARCHS[name], model, train
