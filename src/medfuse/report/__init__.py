"""`medfuse report`: Tables 1-5, paired statistics, Figures 3-6 and results/report.md."""

from medfuse.report.build import build_report

__all__ = ["build_report"]
