"""Explaining image files into a folder: sources, what is written per image, the record, the table, the job."""

from .job import SETTINGS, Summary, explain_files
from .outputs import SAVE_CHOICES, Outputs
from .record import RECORD, Record
from .sources import Listing, Source, collect_images, iter_sources
from .table import TABLE

__all__ = ["RECORD", "SAVE_CHOICES", "SETTINGS", "TABLE", "Listing", "Outputs", "Record", "Source", "Summary",
           "collect_images", "explain_files", "iter_sources"]
