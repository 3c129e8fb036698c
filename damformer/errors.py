"""Exception types of damformer.

Every problem with user input is raised as a subclass of :class:`DamformerError` whose message names the
thing at fault (usually a file), what was expected and what was found. The CLI catches the base class
once and prints the message as one line, with a non-zero exit code and no traceback.
"""

from __future__ import annotations

from pathlib import Path

# Exit codes of every damformer command.
EXIT_USAGE = 2  # a DamformerError: bad input, printed as one line
EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: stopped on request with a checkpoint; run again to continue
EXIT_INTERRUPTED = 130


class DamformerError(Exception):
    """Base class of all errors damformer reports to the user."""


class OptionError(DamformerError):
    """A command-line option value that cannot work (the message names the option)."""


class DataLayoutError(DamformerError):
    """A folder or file of the dataset layout is missing or ambiguous."""


class DataFormatError(DamformerError):
    """A file exists but its content is not what the format prescribes (dtype, shape, values)."""


class DomainSelectionError(DamformerError):
    """A requested domain id or preset does not match the dataset."""


class NoClearDateError(DataFormatError):
    """Every Sentinel-2 date of a patch is cloudy or snowy and the policy says not to keep one."""


class ConfigError(DamformerError):
    """A configuration key is unknown, of the wrong type, or has a bad value, or does not fit the data."""


class DivergedError(DamformerError):
    """A loss or a weight became NaN or infinite: the run stops, its last good checkpoint is kept."""


class OutputExistsError(DamformerError):
    """An output path exists and overwriting was not requested."""


def mismatch(path: Path | str, what: str, *, expected: object, found: object, fix: str = "") -> str:
    """Format the standard one-line message: ``FILE: WHAT: expected X, found Y. FIX``."""
    message = f"{path}: {what}: expected {expected}, found {found}"
    return f"{message}. {fix}" if fix else message
