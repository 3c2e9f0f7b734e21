"""The ``streamer`` command line (``main``): one thin module per command."""
