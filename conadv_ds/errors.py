"""The one error type users see for bad configuration or input."""

from __future__ import annotations

import difflib
from typing import Any, Iterable


class ConfigError(ValueError):
    """A bad config value, path or layout.

    The message is one line: the field (or file), the bad value and what is allowed, so that
    launchers and recipes can print it without a traceback.
    """


class FieldError(ValueError):
    """Raised inside a pydantic validator for a rule that spans fields: names the field it blames,
    so that the one-line `ConfigError` built from it points at that field, not at the block."""

    def __init__(self, field: str, value: Any, rule: str):
        super().__init__(rule)
        self.field, self.value, self.rule = field, value, rule


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for a misspelt `name`, or '' when nothing is close."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""
