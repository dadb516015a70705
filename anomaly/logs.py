"""Logging set-up shared by the job entry points."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    """Configure root logging once for a job; ``ANOMALY_LOG_LEVEL`` overrides the level."""
    chosen = (level or os.environ.get("ANOMALY_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=chosen, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # botocore logs request details at DEBUG, including signed headers.
    logging.getLogger("botocore").setLevel(max(logging.getLogger("botocore").level, logging.INFO))
