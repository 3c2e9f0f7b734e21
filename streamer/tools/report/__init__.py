"""Fit quality reports (Markdown) and smile plots (PNG) over recordings and chains.

``collect`` turns input files into fits and data sets, ``tables`` into statistics and Markdown,
``plots`` into PNGs (imports go one way: ``collect`` and ``plots`` use ``tables``).
"""
