"""
The README's settings table is what operators read: it must name them all.
"""

from __future__ import annotations

from gitlawb.config import SETTINGS
from tests.support import REPO_ROOT


def test_readme_lists_every_setting() -> None:
    """Every environment variable and flag of the settings table is in README.md."""
    readme = (REPO_ROOT / "README.md").read_text()

    missing = [
        s.env
        for s in SETTINGS
        if f"`{s.env}`" not in readme or f"`--{s.flag}`" not in readme
    ]

    assert missing == []
