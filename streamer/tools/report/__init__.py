"""Fit quality reports (Markdown) and smile plots (PNG) over recordings and chains."""
