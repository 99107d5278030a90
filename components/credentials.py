"""credentials: settings that hold a secret, found before anything logs or versions them.

Settings are logged to MLflow as params, copied into tags and artifacts, and versioned by git and
DVC: a credential in them leaks everywhere. components/params.py refuses any setting this module
finds, in params.yaml, in --set overrides and in the flow's parameters, with a message that says
to use the environment instead and never repeats the secret.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel

# Names are judged by whole words (split at `_`, `-`, `.` and camelCase), so `api_token`,
# `mlflowPassword` and `aws_secret_access_key` are refused while `author`, `tokenizer` and
# `max_tokens` (a count) are not.
SECRET_WORDS = frozenset({
    "password", "passwd", "passphrase", "secret", "secrets", "token", "credential",
    "credentials", "auth", "apikey", "accesskey", "privatekey",
})
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key")})
# Values: an address with a user part (`scheme://user:password@host`, or a token as the user),
# and key formats that announce themselves: PEM private keys, AWS access key ids, GitHub tokens.
SECRET_VALUES = (
    (re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]+@"), "a user:password@ part in an address"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_\w{40,})"), "a GitHub token"),
)
SECRET_ADVICE = (
    "secrets never go in params.yaml, --set overrides or flow parameters (settings are logged to "
    "MLflow and versioned by git and DVC). Remove them and give credentials through the "
    "environment of the tool that reads them: MLFLOW_TRACKING_USERNAME and "
    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for MLflow, AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY for S3 artifacts and DVC remotes, PREFECT_API_KEY for Prefect"
)


def _words(name: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name)]


def credential_name(name: str) -> bool:
    """Whether a setting's name says it holds a credential (see SECRET_WORDS)."""
    words = _words(name)
    return bool(SECRET_WORDS.intersection(words)) or any(
        pair in SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


def _redacted(value: str) -> str:
    """`value` with its user part masked, for the message; nothing of it when it holds key
    material, whose extent no pattern knows."""
    if any(pattern.search(value) for pattern, _ in SECRET_VALUES[1:]):
        return "(not shown)"
    value = SECRET_VALUES[0][0].sub(lambda m: m.group(0).split("://")[0] + "://***@", value)
    return json.dumps(value[:200])


def secrets_in(raw: Any, prefix: str = "") -> list[str]:
    """One line per setting in `raw` (nested dicts and lists, at any depth) that is named like
    a credential or whose text carries one; the secret itself is never repeated."""
    found = []
    if isinstance(raw, BaseModel):  # a section built in code: judged by what it holds
        raw = raw.model_dump(mode="json")
    if isinstance(raw, dict):
        for key, value in raw.items():
            where = f"{prefix}{key}"
            if credential_name(str(key)):
                found.append(f"{where}: named like a credential")
            else:
                found += secrets_in(value, f"{where}.")
    elif isinstance(raw, list | tuple):
        for i, value in enumerate(raw):
            found += secrets_in(value, f"{prefix}{i}.")
    elif isinstance(raw, str):
        kinds = [kind for pattern, kind in SECRET_VALUES if pattern.search(raw)]
        if kinds:
            found.append(f"{prefix.rstrip('.')} = {_redacted(raw)}: carries {' and '.join(kinds)}")
    return found


def no_secrets(cls: type, raw: Any) -> Any:
    """A pydantic before-validator (models of settings use it): ValueError naming each
    credential in `raw`."""
    found = secrets_in(raw)
    if found:
        raise ValueError("; ".join(found) + f". {SECRET_ADVICE}")
    return raw


# Minimal stand-in for issue 26's redact() (same signature; the lead keeps issue 26's at merge).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")
_QUERY_SECRET = re.compile(r"(?i)(?P<key>[?&;](?:password|passwd|pwd|token|secret|api_?key)=)"
                           r"[^&;#\s]*")


def redact(text: str) -> str:
    """`text` with every address's user:password@ part and every password or token in a query
    string masked, for logs and messages."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}***", text)
