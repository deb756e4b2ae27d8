"""Requirements (Tako VM's ``requirements``): what a job needs, checked against its image.

Nothing is ever installed at run time (the code is untrusted and has no network): a job runs
only when its job type's image already holds a distribution satisfying every requirement.  The
image's distributions are listed once per image (``Sandbox.distributions``); this module parses
the requirement strings and compares.  Parsing and comparison are ``packaging``'s (PEP 508 and
PEP 440, as pip does), limited to what a check against an image can honour: a name, extras and
version specifiers, never an environment marker or a URL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

__all__ = [
    "Requirement",
    "Wanted",
    "normalize",
    "parse_requirement",
    "unsatisfied",
]


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them: lower case, runs of ``-_.`` as one ``-``."""
    return canonicalize_name(name)


@dataclass(frozen=True)
class Wanted:
    """One parsed requirement: the distribution (normalised) and the versions that do."""

    text: str
    name: str
    specifier: SpecifierSet

    def check(self, installed: Mapping[str, str]) -> str | None:
        """None when ``installed`` (normalised name → version) satisfies it, else why not."""
        version = installed.get(self.name)
        if version is None:
            return f"{self.text} (not installed)"
        if not self.specifier:
            return None
        try:
            parsed = Version(version)
        except InvalidVersion:
            return f"{self.text} (installed {version}, not a comparable version)"
        # The installed version is what it is: a pre-release there satisfies ">=1.0" as pip
        # would accept it once installed, rather than being ignored.
        if self.specifier.contains(parsed, prereleases=True):
            return None
        return f"{self.text} (installed {version})"


def parse_requirement(text: str) -> Wanted:
    """``name[extras] (op version)(, op version)*`` or ``ValueError`` saying what is wrong.

    Extras are accepted (Tako VM's syntax allows them) but only the distribution itself is
    checked: whether the image holds an extra's own dependencies is not decided here.
    """
    stripped = text.strip()
    try:
        parsed = Requirement(stripped)
    except InvalidRequirement as exc:
        # packaging's message goes on with the text and a caret line: its first line is enough
        why = str(exc).splitlines()[0] if str(exc) else "unparsable"
        raise ValueError(f"{text!r} is not a requirement such as 'numpy>=1.20': {why}") from None
    if parsed.url is not None:
        raise ValueError(f"{text!r}: URL requirements are not supported (nothing is installed)")
    if parsed.marker is not None:
        raise ValueError(f"{text!r}: environment markers are not supported")
    return Wanted(text=stripped, name=normalize(parsed.name), specifier=parsed.specifier)


def unsatisfied(requirements: Iterable[str], installed: Mapping[str, str]) -> list[str]:
    """Each requirement ``installed`` does not satisfy, with why, in the order given."""
    missing = []
    for text in requirements:
        problem = parse_requirement(text).check(installed)
        if problem is not None:
            missing.append(problem)
    return missing
