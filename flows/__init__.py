"""Prefect flows and deployments for distill."""

import os

# The stages log through the standard `distill` logger (pipeline/ does not import Prefect); this makes those
# lines (counts per stage, reject reasons, cost) part of the flow run's logs in the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "distill")
