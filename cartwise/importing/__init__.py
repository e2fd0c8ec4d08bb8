"""Bulk import of past events and catalogs from CSV or JSON lines (`cartwise import`).

`mapping` turns a file's rows into contract records (presets, column mappings), `reader`
reads the rows with line numbers, `sender` batches them to the broker and keeps the ledger
that makes a re-run safe, `run` ties them together with progress and a summary.
"""

from cartwise.importing.mapping import EVENT_PRESETS, MappingError, PresetSpec
from cartwise.importing.reader import FORMATS, FileError, Source
from cartwise.importing.run import Importer, Summary

__all__ = ["EVENT_PRESETS", "FORMATS", "FileError", "Importer", "MappingError", "Source",
           "PresetSpec", "Summary"]
