"""A module that must never be imported: a study file or a database names it, a user did not.

Importing it leaves a marker file beside it; the tests check that the marker never appears.
"""

from pathlib import Path

Path(__file__).with_name("evil-was-imported").write_text("imported\n")


def build(*args: object, **kwargs: object) -> None:
    Path(__file__).with_name("evil-was-called").write_text("called\n")
