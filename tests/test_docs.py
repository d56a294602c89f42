"""Docstrings that point somewhere point at something: every qualified Sphinx reference in the
package (``:func:`tlsearch.training.finetune```, ``:class:`~tlsearch.models.BlockNet```,
``:meth:`Trainer.epoch <tlsearch.training.trainer.Trainer.epoch>```) names a module, or an
attribute of one, that exists. A docstring naming a function that was renamed or removed is a bug
(STYLE.md: a docstring that no longer says what the code does)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tlsearch"
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`([^`]+)`")
# The libraries a reference may point into besides tlsearch itself.
ROOTS = ("tlsearch.", "optuna.", "torch.")


def _references() -> list[tuple[str, str]]:
    """(where, target) for every qualified reference in the package's docstrings and comments."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for match in ROLE.finditer(text):
            target = match.group(1)
            if "<" in target:  # "shown text <target>"
                target = target[target.index("<") + 1 : target.rindex(">")]
            target = re.sub(r"\s+", "", target).lstrip("~")
            if target.startswith(ROOTS):
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{path.relative_to(PACKAGE.parent)}:{line}", target))
    return found


def _resolves(target: str) -> bool:
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        rest = parts[cut:]
        for i, name in enumerate(rest):
            if not hasattr(obj, name):
                last = i == len(rest) - 1
                return last and inspect.isclass(obj) and _instance_attr(obj, name)
            obj = getattr(obj, name)
        return True
    return False


def _instance_attr(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` have ``name``: a dataclass field or a ``self.name = ...``."""
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    for klass in cls.__mro__:
        try:
            tree = ast.parse(inspect.getsource(klass).strip())
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and node.attr == name
                and isinstance(node.ctx, ast.Store)
            ):
                return True
    return False


REFERENCES = _references()


def test_the_package_has_qualified_references() -> None:
    assert len(REFERENCES) > 50  # the scan finds them: a broken pattern would pass vacuously


@pytest.mark.parametrize(("where", "target"), REFERENCES, ids=[w for w, _ in REFERENCES])
def test_reference_resolves(where: str, target: str) -> None:
    assert _resolves(target), f"{where}: {target} does not exist"


def test_a_stale_reference_is_caught() -> None:
    assert not _resolves("tlsearch.training.fold.delta_attention")
    assert not _resolves("tlsearch.training.trainer.Trainer.no_such_method")
    assert _resolves("tlsearch.training.trainer.Trainer.epochs_trained")  # set in __init__
    assert _resolves("tlsearch.params.TrialParams.hyperparameters")  # a dataclass field
