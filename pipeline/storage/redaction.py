"""Redaction: scrub AWS credentials from any text that could reach a log or an error row."""

from __future__ import annotations

import os
import re

_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_REDACTED = "***"
# key=value / key: value / "key": "value" forms of credential settings, any case.
_SECRET_ASSIGN_RE = re.compile(
    r"""(?ix)
    (?P<key>["']?(?:aws_)?(?:secret_access_key|access_key_id|session_token|secret_key|
        security_token)["']?)
    (?P<sep>\s*[=:]\s*)
    (?P<value>["']?)[^\s"',;&}]+(?P=value)
    """
)
# Presigned-URL query parameters that embed a signature or credential scope.
_SIGNED_PARAM_RE = re.compile(
    r"(?i)(?P<key>X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+"
)
# Long-term (AKIA) and temporary (ASIA) access key ids.
_ACCESS_KEY_ID_RE = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


def redact(text: str) -> str:
    """Remove AWS credentials from ``text`` before it reaches a log line or an error row.

    Scrubs the values of ``AWS_SECRET_ACCESS_KEY``, ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SESSION_TOKEN`` currently in the environment, ``aws_secret_access_key=...``-style
    assignments, presigned-URL signatures and anything shaped like an access key id.
    """
    if not isinstance(text, str):
        text = str(text)
    # Longest first so a value that contains another is not left half-replaced.
    values = sorted(
        {os.environ.get(var, "") for var in _SECRET_ENV_VARS} - {""}, key=len, reverse=True
    )
    for value in values:
        if len(value) >= 4:  # avoid mangling text when a test sets a trivially short value
            text = text.replace(value, _REDACTED)
    text = _SECRET_ASSIGN_RE.sub(
        lambda m: (
            f"{m.group('key')}{m.group('sep')}{m.group('value')}{_REDACTED}{m.group('value')}"
        ),
        text,
    )
    text = _SIGNED_PARAM_RE.sub(lambda m: m.group("key") + _REDACTED, text)
    return _ACCESS_KEY_ID_RE.sub(_REDACTED, text)
