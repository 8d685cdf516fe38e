"""Every setting is documented in the README."""

from __future__ import annotations

from pathlib import Path

from stream.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = [
        f"ISTREAM_{name.upper()}" for name in Settings.model_fields if f"ISTREAM_{name.upper()}" not in README
    ]
    assert missing == []
