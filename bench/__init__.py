"""ShadowSpot benchmark: intake vs DCMTK, end-to-end latency, pipeline steps, model, memory.

Run everything with ``.venv/bin/python -m bench`` (or ``make bench``); see ``bench/__main__.py``.
"""
