"""One family of errors, so callers can catch everything this package raises deliberately.

Messages follow one rule: say what was given, what is needed, and how to fix it.
"""


class LlamaFTError(Exception):
    """Base class of every error llama_ft raises on purpose."""


class ConfigError(LlamaFTError, ValueError):
    """A recipe, model config or command-line value that cannot work."""


class DataError(LlamaFTError, ValueError):
    """A data set that is missing, empty, unreachable or shaped wrongly."""


class PlanError(LlamaFTError, ValueError):
    """No parallel layout fits, or a pinned layout choice cannot work."""
