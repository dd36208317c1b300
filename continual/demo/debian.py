"""A real text stream: Debian package descriptions labeled by their archive section.

``apt-cache dumpavail`` lists every package the machine's apt lists know (63k on a
Debian 12 host): each has a one-line ``Description:`` and a ``Section:``
(``contrib/`` and ``non-free/`` prefixes stripped). The classifier learns the
section from the description.

The drift is the archive's own split between **applications** and their
**support packages**. Applications ("Real-time strategy game of ancient warfare")
come first; later the stream brings the packages that carry an application's
libraries, data, documentation and language bindings: names starting with
``lib``/``python3-``/``r-cran-``/``golang-``/``node-``/``ruby-`` or ending in
``-data``/``-common``/``-doc``/``-dev``. Their descriptions use another
vocabulary ("... (data files)", "library for ...", "development files for ...",
"Python 3 module for ..."), and the shares of the sections differ (games brings
many -data packages, fonts none), so both the inputs and the label mix move while
the label set stays the same: a covariate shift a catalogue classifier meets when
it is first fed end-user software and then the whole archive.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

# Topic sections (the language sections -- python, golang, rust, gnu-r, ... -- are the packaging ecosystems
# themselves, not topics, and are left out).
CLASSES = ("games", "science", "sound", "graphics", "net", "admin", "text", "utils")
LIBRARY_PREFIXES = ("lib", "python3-", "r-cran-", "golang-", "node-", "ruby-")
DATA_SUFFIXES = ("-data", "-common", "-doc")
SUPPORT_PREFIXES = LIBRARY_PREFIXES
SUPPORT_SUFFIXES = (*DATA_SUFFIXES, "-dev")
_SECTION_PREFIX = re.compile(r"^(contrib|non-free|non-free-firmware)/")


class NoAptLists(RuntimeError):
    """This machine has no apt package lists (``apt-cache`` missing or knowing no packages)."""


@dataclass(frozen=True)
class Package:
    name: str
    section: str
    text: str

    @property
    def support(self) -> bool:
        return is_support(self.name)

    @property
    def id(self) -> str:
        return "deb:" + self.name


def is_support(name: str) -> bool:
    return name.startswith(SUPPORT_PREFIXES) or name.endswith(SUPPORT_SUFFIXES)


def kind_of(name: str) -> str:
    """ "app", "library" (libraries, language bindings, -dev) or "data" (-data, -common, -doc)."""
    if name.endswith(DATA_SUFFIXES) and not name.startswith(LIBRARY_PREFIXES):
        return "data"
    return "library" if is_support(name) else "app"


def dumpavail() -> str:
    """``apt-cache dumpavail``; :class:`NoAptLists` with the reason when there is nothing to read."""
    exe = shutil.which("apt-cache")
    if exe is None:
        raise NoAptLists("apt-cache is not installed (the Debian text stream needs a Debian/Ubuntu host)")
    out = subprocess.run([exe, "dumpavail"], capture_output=True, text=True, check=False, timeout=120)
    if out.returncode != 0 or "Package:" not in out.stdout:
        raise NoAptLists(f"apt-cache dumpavail listed no packages (exit {out.returncode}); run apt-get update first")
    return out.stdout


def parse(dump: str, classes: tuple[str, ...] = CLASSES) -> list[Package]:
    """Packages of ``classes`` with their descriptions; a description given for two sections is dropped."""
    found: dict[str, Package] = {}
    for stanza in dump.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(": ")
            if sep and not line.startswith(" "):
                fields.setdefault(key, value.strip())
        name, section, text = fields.get("Package"), fields.get("Section"), fields.get("Description")
        if not (name and section and text):
            continue
        section = _SECTION_PREFIX.sub("", section)
        if section in classes and name not in found:
            found[name] = Package(name, section, text)
    sections_of: dict[str, set[str]] = {}
    for p in found.values():
        sections_of.setdefault(p.text, set()).add(p.section)
    seen: set[str] = set()
    out = []
    for p in sorted(found.values(), key=lambda p: p.name):
        # One sample per description: identical texts would be duplicates (or contradictions) in the store.
        if len(sections_of[p.text]) == 1 and p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out


def packages(classes: tuple[str, ...] = CLASSES) -> list[Package]:
    return parse(dumpavail(), classes)


def stable_order(items: list[Package], seed: int) -> list[Package]:
    """A shuffle that depends only on the names and the seed (not on the order apt lists them)."""
    return sorted(items, key=lambda p: hashlib.sha256(f"{seed}:{p.name}".encode()).hexdigest())


def split_stream(
    pkgs: list[Package], *, per_class_test: int, seed: int = 0
) -> tuple[list[Package], list[Package], list[Package], list[Package]]:
    """(apps train pool, support train pool, apps test, support test): each test set balanced per class."""
    out: tuple[list[Package], list[Package], list[Package], list[Package]] = ([], [], [], [])
    for support in (False, True):
        pool, test = out[int(support)], out[2 + int(support)]
        taken: Counter[str] = Counter()
        for p in stable_order([p for p in pkgs if p.support == support], seed):
            if taken[p.section] < per_class_test:
                taken[p.section] += 1
                test.append(p)
            else:
                pool.append(p)
    return out
