"""The report: one static, self-contained HTML page plus ``report.json`` from a run's stored artefacts.

It shows and never computes: every number on the page is copied from a file in the run directory,
and ``report.json`` records each block with its source path. ``build_report(run)`` writes both;
``alignscope.report.serve.make_server`` shows the page on 127.0.0.1 only (``alignscope view``).
"""

from alignscope.report.build import REPORT_HTML, REPORT_JSON, ReportPaths, build_report

__all__ = ["REPORT_HTML", "REPORT_JSON", "ReportPaths", "build_report"]
