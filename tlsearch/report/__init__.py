"""A self-contained HTML report of a study, with its figures also saved as PNG files.

- :mod:`~tlsearch.report.data`: what is read from the study and from ``tlsearch final``'s
  results (the trials as points, the best trial, the summary and trial tables);
- :mod:`~tlsearch.report.figures`: the matplotlib figures;
- :mod:`~tlsearch.report.html`: ``report.html`` and :func:`write_report`.
"""

from tlsearch.export import FINAL_MODELS, read_final
from tlsearch.report.html import write_report

__all__ = ["FINAL_MODELS", "read_final", "write_report"]
