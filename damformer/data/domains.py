"""FLAIR-2 domains (département + year) and their selection by id, id prefix or preset."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

from damformer.errors import DomainSelectionError

log = logging.getLogger(__name__)

DOMAIN_PATTERN = re.compile(r"^D\d{3}_\d{4}$")
"""A domain folder: ``D{ddd}_{yyyy}``, e.g. ``D004_2021``."""

DOMAIN_PRESETS: dict[str, tuple[str, ...]] = {
    # DAM-Former's split of labelled FLAIR-2 train domains (method.md section 4).
    "north": ("D080", "D060", "D008", "D051", "D077"),
    "south": ("D081", "D032", "D031", "D046", "D034"),
}
"""Named domain groups, by département prefix (matched against ``D{ddd}_{yyyy}`` folder names)."""


def domain_year(domain: str) -> int:
    """Return the year of a domain id such as ``D004_2021``."""
    return int(domain.rsplit("_", 1)[1])


def _matches(token: str, domain: str) -> bool:
    # "D080" is the authors' spelling and names the département whatever the year.
    return domain == token or domain.startswith(token + "_")


_WARNED_PRESETS: set[tuple] = set()


def select_domains(available: Iterable[str], requested: Sequence[str] | None) -> list[str]:
    """Resolve a user's domain request against the domains present on disk.

    Args:
        available: domain folder names found in the dataset.
        requested: ids (``D080_2021``), département prefixes (``D080``), presets (``north``, ``south``) or
            ``all``; ``None`` or empty means all. Comma-separated items are accepted too.

    Returns:
        The selected domains, sorted, without duplicates.

    Raises:
        DomainSelectionError: an explicit id matches nothing, or a preset matches nothing at all.
    """
    available_sorted = sorted(set(available))
    if not requested:
        return available_sorted
    tokens = [t.strip() for item in requested for t in item.split(",") if t.strip()]
    chosen: set[str] = set()
    for token in tokens:
        key = token.lower()
        if key == "all":
            chosen.update(available_sorted)
        elif key in DOMAIN_PRESETS:
            members = DOMAIN_PRESETS[key]
            found = [d for d in available_sorted if any(_matches(p, d) for p in members)]
            missing = [p for p in members if not any(_matches(p, d) for d in available_sorted)]
            if not found:
                raise DomainSelectionError(
                    f"preset '{token}' = {', '.join(members)}: none of these domains is in the dataset "
                    f"(available: {', '.join(available_sorted) or 'none'})"
                )
            message_key = (key, tuple(missing), tuple(found))
            if missing and message_key not in _WARNED_PRESETS:  # once per process, not per reader
                _WARNED_PRESETS.add(message_key)
                log.warning(
                    "preset '%s': %d of its %d domains are not in this dataset (%s); using %s",
                    token,
                    len(missing),
                    len(members),
                    ", ".join(missing),
                    ", ".join(found),
                )
            chosen.update(found)
        else:
            token_id = token.upper()
            if not re.match(r"^D\d{3}(_\d{4})?$", token_id):
                raise DomainSelectionError(
                    f"domain '{token}': expected an id like D080_2021, a prefix like D080, "
                    f"'all' or a preset ({', '.join(DOMAIN_PRESETS)}) "
                    f"(available: {', '.join(available_sorted) or 'none'})"
                )
            found = [d for d in available_sorted if _matches(token_id, d)]
            if not found:
                raise DomainSelectionError(
                    f"domain '{token}' is not in the dataset "
                    f"(available: {', '.join(available_sorted) or 'none'})"
                )
            chosen.update(found)
    return sorted(chosen)
