"""Engines: where and when the extraction stages run. ``local`` (one process) or ``ray`` (a Ray cluster).

Both call the same stages (``extract.stages``) and commit through the same writer
(``extract.writer``); they differ only in scheduling.
"""

ENGINES = ("local", "ray")
