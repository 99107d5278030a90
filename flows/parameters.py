"""Flow parameters: the params file, typed overrides per section, and command-line style overrides.

Every settings section (`components.core.params.sections()`, one list) becomes a flow parameter of
the same name through `with_sections`: an overrides model with the section's fields, types and
ranges, every field optional (empty = keep the file's value). Prefect renders these as a form in its
UI and checks types and ranges before a run starts. The `overrides` parameter takes
`section.key=value` strings exactly as `--set` does on the command line: that is how a key is set
back to null (`model.checkpoint=null`) or a whole mapping given as one value.

`run_form` sets what the Run form shows (the parameter schema `prefect deploy` reads from the flow
object): each section filled with params.yaml's values as read where the flow's module is
imported (`prefect deploy` runs in the project: the deployed settings), and without the
parameters only a program sets. The flow's function keeps its own signature, so a run given no
section still reads the params file it is given.

`resolve` turns both into `section.key=value` strings and reads them with the file through the
one parser (`components.core.params.load_params`), so the rules and the messages are those of
`cnn-pipeline <step> --set`.

    cnn-pipeline check --set train.epochs=5 ...   # validated, as a deployment run's JSON
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, create_model, model_validator

from components.core.params import DEFAULT_PARAMS, Params, UserError, load_params, sections
from components.core.secrets import no_secrets


def _overrides_model(name: str, section: type[BaseModel]) -> type[BaseModel]:
    fields = {}
    for key, info in section.model_fields.items():
        info = copy.copy(info)
        info.default = None
        info.description = info.description or "empty: the params file's value"
        fields[key] = (Optional[info.annotation], info)  # noqa: UP045 (a runtime type)
    return create_model(
        f"{section.__name__}Overrides",
        __config__=ConfigDict(extra="forbid", frozen=True),
        __doc__=f"Overrides of params.yaml's `{name}` section; empty fields keep the file's.",
        # A credential-like key is refused as such, before "unknown key"
        # (components/core/params.py).
        __validators__={"no_secrets": model_validator(mode="before")(no_secrets)},
        **fields,
    )


OVERRIDES = {name: _overrides_model(name, model) for name, model in sections().items()}


def with_sections(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(..., **sections)` declared with one keyword parameter per settings section, typed by
    its overrides model, after its own parameters: Prefect reads the declared signature for the
    parameter form and validation, so a new section reaches every flow without an edit."""
    signature = inspect.signature(fn, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=model(),
                               annotation=model) for name, model in OVERRIDES.items()]
    fn.__signature__ = signature.replace(parameters=[*own, *added])
    return fn


def run_form(*hidden: str) -> Callable[[Any], Any]:
    """A decorator over a Prefect Flow that sets its Run form as described above, leaving out
    the parameters `hidden`: the form's schema comes from the flow object's `__signature__`
    (inspect stops unwrapping there), its calls still go to the function's own signature."""

    def apply(flow: Any) -> Any:
        values = _file_settings()
        signature = inspect.signature(flow.fn)
        shown = [p.replace(default=OVERRIDES[p.name](**getattr(values, p.name).model_dump()))
                 if p.name in OVERRIDES else p
                 for p in signature.parameters.values() if p.name not in hidden]
        flow.__signature__ = signature.replace(parameters=shown)
        return flow

    return apply


def _file_settings() -> Params:
    """params.yaml here, validated; the defaults when it is missing or refused (the run itself
    refuses it then, with the message)."""
    try:
        return load_params(DEFAULT_PARAMS) if Path(DEFAULT_PARAMS).is_file() else Params()
    except UserError:
        return Params()


def given(**sections: BaseModel | dict | None) -> dict[str, dict[str, Any]]:
    """The fields each section's overrides set (models or plain dicts), as plain dicts."""
    out = {}
    for section, values in sections.items():
        if isinstance(values, BaseModel):
            values = values.model_dump(mode="json", exclude_none=True)
        out[section] = {k: v for k, v in (values or {}).items() if v is not None}
    return out


def override_list(**sections: BaseModel | dict | None) -> list[str]:
    """`section.key=value` strings (values as JSON, which YAML reads back) for set fields."""
    return [f"{section}.{key}={json.dumps(value)}"
            for section, values in given(**sections).items() for key, value in values.items()]


def resolve(params_file: str | Path = DEFAULT_PARAMS, overrides: list[str] = (),
            **sections: BaseModel | dict | None) -> Params:
    """The validated settings: `params_file` with the sections' fields, then `overrides`."""
    return load_params(params_file, [*override_list(**sections), *overrides])


def from_parameters(parameters: dict[str, Any]) -> Params:
    """The validated settings of a flow run's parameters (params_file, overrides, sections)."""
    sections_given = {k: v for k, v in parameters.items() if k in Params.model_fields}
    return resolve(parameters.get("params_file", DEFAULT_PARAMS),
                   parameters.get("overrides", []), **sections_given)


def deployment_parameters(params_file: str, overrides: list[str]) -> dict[str, Any]:
    """The overrides, validated with the file by the command line, as a deployment run's
    parameters (`cnn-pipeline check`, for `prefect deployment run --params`: the Makefile's
    `pipeline SET=...`)."""
    return {"overrides": overrides} if overrides else {}
