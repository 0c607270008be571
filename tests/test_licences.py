"""The project's licence is the Apache License 2.0 text, and every package requirements.txt pins
is under a permissive licence or is named in docs/licences.md (which says what its licence means
for users): read from the installed packages' own metadata, as pip installed them."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PERMISSIVE = re.compile(r"\b(MIT|BSD|Apache|PSF|Python Software Foundation|ISC|Zlib|0BSD|CC0|BSL-1\.0|"
                        r"License agreement for matplotlib)\b", re.IGNORECASE)
COPYLEFT = re.compile(r"\b(GPL|LGPL|AGPL|MPL|EUPL|CDDL|EPL)\b|General Public License|Mozilla", re.IGNORECASE)


def pinned() -> list[tuple[str, str]]:
    pins = []
    for line in (REPO / "requirements.txt").read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, _, version = requirement.partition("==")
            pins.append((name.strip(), version.strip()))
    return pins


def licence_of(name: str) -> str:
    """The licence as the package's metadata states it: License-Expression, else License's first
    line, and the License classifiers."""
    meta = metadata(name)
    stated = meta.get("License-Expression") or next(iter((meta.get("License") or "").strip().splitlines()), "")
    classifiers = [c.rsplit("::", 1)[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    return " ".join([stated] + [f"[{c}]" for c in classifiers]).strip()


def test_the_licence_file_is_the_apache_2_0_text():
    text = (REPO / "LICENSE").read_text()
    assert text.strip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) >= 200  # the whole text, appendix included


def test_every_pinned_package_is_permissive_or_explained_in_the_licence_notes():
    notes = (REPO / "docs" / "licences.md").read_text()
    unexplained = []
    for name, version in pinned():
        try:
            licence = licence_of(name)
        except PackageNotFoundError:
            unexplained.append(f"{name}=={version}: not installed, so its licence cannot be read")
            continue
        assert licence, f"{name}: no licence in its metadata"
        if COPYLEFT.search(licence) or not PERMISSIVE.search(licence):
            if f"**{name}**" not in notes and f"| {name} " not in notes:
                unexplained.append(f"{name}=={version}: {licence}")
    assert not unexplained, ("packages whose licence docs/licences.md does not explain: " + "; ".join(unexplained))
    assert "**GPL-3.0**" in notes and "**pylibjpeg-libjpeg**" in notes
