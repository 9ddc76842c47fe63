"""Names and values checked at the API boundary, with MLflow's own rules.

A name MLflow rejects would otherwise only fail in the writer thread, long after the call and
far from the code that chose it; checking here turns it into a TrackingError at the call site.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from hvdkit.errors import TrackingError
from hvdkit.tracking._mlflow_private import REST_MAX_ENTITY_KEY_LENGTH, length_limits, name_problem


def _name_fix() -> str:
    return (
        "use only letters, digits, _ - . / : and spaces, at most "
        f"{length_limits().key} characters, not starting with '/' or containing '..'"
    )


# Names already checked, per rule: log_metrics is called with the same few keys every epoch.
_ok_metric_names: set[tuple[bool, str]] = set()


def _check_name(kind: str, key: str, import_mlflow: bool = True) -> str:
    problem = name_problem(kind, key, import_mlflow=import_mlflow)
    if problem is not None:
        raise TrackingError(f"MLflow rejects {kind} name {key!r}: {problem}", fix=_name_fix())
    return key


def _check_key_length(kind: str, key: str, import_mlflow: bool = True) -> str:
    limit = length_limits().key if import_mlflow else REST_MAX_ENTITY_KEY_LENGTH
    if len(key) > limit:
        raise TrackingError(f"{kind} name {key[:40]!r}... is longer than {limit} characters", fix=_name_fix())
    return key


def check_metric_name(key: object, *, import_mlflow: bool = True) -> str:
    """``key`` if MLflow accepts it as a metric name. ``import_mlflow=False`` checks by MLflow's
    documented rule and limit instead of its validator: the ranks that do not write (the writer's
    rank checks the same names with MLflow's own code, and its error ends the job)."""
    if isinstance(key, str) and (import_mlflow, key) in _ok_metric_names:
        return key
    if not isinstance(key, str):
        raise TrackingError(f"metric name {key!r} is not a string", fix="name metrics with str keys")
    _check_key_length("metric", _check_name("metric", key, import_mlflow), import_mlflow)
    _ok_metric_names.add((import_mlflow, key))
    return key


def check_metric_value(key: str, value: object) -> float:
    # bool is an int to Python but MLflow rejects it; numpy scalars convert through float().
    if isinstance(value, bool):
        raise TrackingError(f"metric {key!r} has a bool value {value!r}", fix="log 0/1 or a float")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TrackingError(
            f"metric {key!r} has a non-numeric value {value!r}", fix="log a number (int, float, numpy scalar)"
        ) from None


def check_param_name(key: str) -> str:
    return _check_key_length("param", _check_name("param", key))


def check_tag_name(key: str) -> str:
    return _check_name("tag", key)


def _truncate(value: str, limit: int) -> str:
    # Truncated rather than rejected: a long value (a host list, a big recipe section) is still
    # useful cut short, and failing the job over it would be worse.
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        try:
            return json.dumps(list(value), default=str, separators=(",", ":"))
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def flatten_params(params: Mapping[str, Any], *, sep: str = ".") -> dict[str, str]:
    """Nested mappings become dotted keys (``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``),
    lists become compact JSON, and every value is cut to MLflow's param length limit.

    Raises TrackingError naming a key MLflow would reject.
    """
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            if not value and prefix:
                out[prefix] = "{}"
            for k, v in value.items():
                walk(f"{prefix}{sep}{k}" if prefix else str(k), v)
            return
        out[check_param_name(prefix)] = _truncate(_to_str(value), length_limits().param_value)

    walk("", params)
    return out


def clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags as MLflow stores them: checked names, str values cut to the tag length limit."""
    return {check_tag_name(str(k)): _truncate(_to_str(v), length_limits().tag_value) for k, v in tags.items()}


def check_experiment_name(name: object) -> str:
    """An experiment name MLflow accepts (``--experiment``), checked before a job starts: rank 0
    would otherwise fail to create it once the job runs."""
    limit = length_limits().experiment_name
    if not isinstance(name, str) or not name.strip():
        raise TrackingError(f"experiment name {name!r} is empty", fix="pass --experiment NAME, or leave it out for 'hvdkit'")
    if len(name) > limit:
        raise TrackingError(f"experiment name {name[:40]!r}... is longer than {limit} characters",
                            fix=f"pass a name of at most {limit} characters")
    return name
