"""Tools on top of the pipeline: the market simulator, quality reports and plots, benchmarks."""
