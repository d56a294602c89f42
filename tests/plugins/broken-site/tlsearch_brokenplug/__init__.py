"""An installed plug-in whose import fails, as one does when a dependency of it is missing."""

from __future__ import annotations

import tlsearch_brokenplug_missing_dependency  # noqa: F401 - the import is what fails

from tlsearch.registry import Entry

ENTRY = Entry(name="brokenplug", target="tlsearch_brokenplug.model:build")
