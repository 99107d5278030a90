"""Flow parameters: the params file plus typed overrides per section, validated like params.yaml.

Each section of `components.params.Params` gets an overrides model with the same fields, types and
ranges, every field optional (empty = keep the file's value). Prefect renders these models as a
form in its UI and checks types and ranges before a run starts; `resolve` then merges the
overrides into the file and validates the whole, exactly as `python -m components.<step> --set`
does, so cross-field rules and error messages are the same as for params.yaml.

An override cannot set a key back to null (null means "not overridden"); edit the file for that.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, create_model, model_validator

from components.credentials import no_secrets
from components.params import DEFAULT_PARAMS, Params, load_params


def _overrides_model(section: type[BaseModel]) -> type[BaseModel]:
    fields = {}
    for name, info in section.model_fields.items():
        info = copy.copy(info)
        info.default = None
        info.description = info.description or "empty: the params file's value"
        fields[name] = (Optional[info.annotation], info)  # noqa: UP045 (a runtime type)
    return create_model(
        f"{section.__name__}Overrides",
        __config__=ConfigDict(extra="forbid", frozen=True),
        __doc__=f"Overrides of params.yaml's `{section.__name__.lower()}` section.",
        # A credential-like key is refused as such, before "unknown key" (components/params.py).
        __validators__={"no_secrets": model_validator(mode="before")(no_secrets)},
        **fields,
    )


SECTIONS = tuple(Params.model_fields)
PathsOverrides, DataOverrides, AugmentOverrides, ModelOverrides, TrainOverrides, \
    EvaluateOverrides, RegisterOverrides = (
        _overrides_model(Params.model_fields[name].annotation) for name in SECTIONS)


def override_list(**sections: BaseModel | dict | None) -> list[str]:
    """`section.key=value` strings (values as JSON, which YAML reads back) for set fields."""
    out = []
    for section, values in sections.items():
        if values is None:
            continue
        if isinstance(values, BaseModel):
            values = values.model_dump(mode="json", exclude_none=True)
        for key, value in values.items():
            if value is not None:
                out.append(f"{section}.{key}={json.dumps(value)}")
    return out


def resolve(params_file: str | Path = DEFAULT_PARAMS, **sections) -> Params:
    """The validated settings: `params_file` with the sections' overrides applied."""
    return load_params(params_file, override_list(**sections))
