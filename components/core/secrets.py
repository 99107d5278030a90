"""credentials: what is a secret, found before anything logs or versions it, and masked in text.

Settings are logged to MLflow as params, copied into tags and artifacts, and versioned by git and
DVC: a credential in them leaks everywhere. components/core/params.py refuses any setting this
module finds, in params.yaml, in --set overrides and in the flow's parameters, with a message that
says to use the environment instead and never repeats the secret.

The one definition of a secret in text, used both ways: `secrets_in` refuses a setting that holds
one, `redact` masks every one in a message (every UserError's message passes through it, see
components/core/params.py) and `shown` gives an address without them (for tags and files). In an
address: the user part (`scheme://user:password@`, or a token as the user) and query parameters
named like a credential (`?password=`, `?token=`, `?api_key=`, `&sig=`, ...); anywhere: key
formats that announce themselves (PEM private keys, AWS access key ids, GitHub tokens).
"""

from __future__ import annotations

import functools
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
# Query parameters that carry a secret under a name no setting has: Google's `key`, the
# signatures of pre-signed S3 and Azure SAS addresses, libpq's `pwd`.
SECRET_PARAMS = frozenset({"key", "sig", "signature", "pwd"})
MASK = "***"

SCHEME = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://")
# The user part of an address, as either kind of reader finds it: urllib and browsers take the
# host part (up to the first / ? #) up to its last @; SQLAlchemy (database URLs) takes
# `user:password@` with a password that runs to the next @, slashes included. Whichever is
# longer is the secret: a password may hold an @ or a / that its writer did not escape. (A port,
# `host:8080/...`, is not the start of a password.)
USERINFO = (re.compile(r"[^/?#\s]*@"), re.compile(r"[^:/?#@\s]*:(?!\d*(?:[/?#\s]|$))[^@\s]*@"))
# `name=value` in a query string, a libpq `key=value` string, or a message quoting a setting;
# not a path's `/key=3/` (partitioned data).
PARAM = re.compile(r"(?:^|(?<=[?&;\s'\"(,\[{]))([A-Za-z][\w.-]*)=([^&#\s'\"]+)")
KEY_MATERIAL = (
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:.*?-----END [A-Z ]*PRIVATE KEY-----|.*)",
                re.S), "a private key"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_\w{40,})"), "a GitHub token"),
)
SECRET_ADVICE = (
    "secrets never go in params.yaml, --set overrides or flow parameters (settings are logged to "
    "MLflow and versioned by git and DVC). Remove them and give credentials through the "
    "environment of the tool that reads them: MLFLOW_TRACKING_USERNAME and "
    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for MLflow, AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY for S3 artifacts and DVC remotes, PREFECT_API_KEY for Prefect, "
    "CNN_PIPELINE_SEARCH_STORAGE for the search's database"
)


def _words(name: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name)]


def credential_name(name: str) -> bool:
    """Whether a setting's name says it holds a credential (see SECRET_WORDS)."""
    words = _words(name)
    return bool(SECRET_WORDS.intersection(words)) or any(
        pair in SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


@functools.lru_cache(maxsize=4096)  # a long text repeats its names
def _secret_param(name: str, in_query: bool) -> bool:
    """Named like a credential anywhere; in a query string also `key`, `...-Signature`, ..."""
    words = _words(name)
    return credential_name(name) or in_query and bool(words) and words[-1] in SECRET_PARAMS


def _userinfo_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each address's user part in `text`, its @ included."""
    spans = []
    schemes = list(SCHEME.finditer(text))
    stops = [m.start() for m in schemes[1:]] + [len(text)]
    for scheme, stop in zip(schemes, stops, strict=False):
        # Looked for up to the next address only: each part of the text is read once, however
        # many addresses it holds (a long setting of them would otherwise take hours).
        ends = [m.end() for p in USERINFO if (m := p.match(text, scheme.end(), stop))]
        if ends:
            spans.append((scheme.end(), max(ends)))
    return spans


def _params(text: str) -> list[re.Match]:
    return [m for m in PARAM.finditer(text)
            if _secret_param(m.group(1), m.start() > 0 and text[m.start() - 1] in "?&;")]


def kinds_of_secret(text: str) -> list[str]:
    """What secrets `text` carries, in words; empty when none."""
    kinds = ["a user:password@ part in an address"] if _userinfo_spans(text) else []
    names = sorted({m.group(1) for m in _params(text)})
    if names:
        kinds.append(f"a credential as a parameter ({', '.join(f'{n}=' for n in names)})")
    return kinds + [kind for pattern, kind in KEY_MATERIAL if pattern.search(text)]


def _replace(text: str, user: str, param: str | None) -> str:
    """`text` with each user part replaced by `user`, each secret parameter's value by `param`
    (None: the parameter is dropped) and key material by MASK."""
    for pattern, _ in KEY_MATERIAL:
        text = pattern.sub(MASK, text)
    text = _splice(text, [(start, end, user) for start, end in _userinfo_spans(text)])
    cuts = []
    for m in _params(text):
        if param is not None:
            cuts.append((m.start(2), m.end(2), param))
        else:  # the parameter and the separator before it (the first's ? stays for the rest)
            start = m.start() - 1 if m.start() and text[m.start() - 1] in "&;" else m.start()
            after = start == m.start() and text[m.end():m.end() + 1] in ("&", ";")
            cuts.append((start, m.end() + after, ""))
    return _splice(text, cuts)


def _splice(text: str, cuts: list[tuple[int, int, str]]) -> str:
    """`text` with each (start, end) range, in order and apart, replaced by its string."""
    pieces, at = [], 0
    for start, end, new in cuts:
        pieces += [text[at:start], new]
        at = end
    return "".join(pieces) + text[at:]


def unescaped_userinfo(uri: str) -> bool:
    """Whether an address's user part holds an @ or a / that is not percent-encoded: readers
    split it differently (SQLAlchemy would send part of the password as the host name, which a
    driver's error then prints), so such an address is refused, not read."""
    return any(set(uri[start:end - 1]) & {"@", "/"} for start, end in _userinfo_spans(uri))


def redact(text: str) -> str:
    """`text` with every secret this module knows masked (`scheme://***@host`, `?token=***`):
    for messages and log lines that may hold an address or a setting."""
    return _replace(str(text), MASK + "@", MASK)


def shown(uri: str) -> str:
    """The address `uri` without its secrets (no user part, no secret query parameter): still an
    address, for tags, files and comparisons; the password comes from the environment."""
    return _replace(str(uri), "", None).replace("?#", "#").rstrip("?")


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
        kinds = kinds_of_secret(raw)
        if kinds:
            # Beside key material may stand the rest of the secret (an AWS secret key after
            # its id), whose extent no pattern knows: nothing of such a value is shown.
            material = any(pattern.search(raw) for pattern, _ in KEY_MATERIAL)
            shown_value = "(not shown)" if material else json.dumps(redact(raw)[:200])
            found.append(f"{prefix.rstrip('.')} = {shown_value}: carries {' and '.join(kinds)}")
    return found


def no_secrets(cls: type, raw: Any) -> Any:
    """A pydantic before-validator (models of settings use it): ValueError naming each
    credential in `raw`."""
    found = secrets_in(raw)
    if found:
        raise ValueError("; ".join(found) + f". {SECRET_ADVICE}")
    return raw
