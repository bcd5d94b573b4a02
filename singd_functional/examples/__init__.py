"""Worked examples on data that ships with Python (no download).

- :mod:`singd_functional.examples.chargpt`: a small GPT-style character model trained
  on the standard library's own ``.py`` sources.
"""
