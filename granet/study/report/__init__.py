"""Study reports drawn from the Parquet tables alone: figures (:mod:`.figures`) and tables
(:mod:`.tables`). ``granet report STUDY_DIR`` draws them again at any time."""

from granet.study.report.figures import make_report

__all__ = ["make_report"]
