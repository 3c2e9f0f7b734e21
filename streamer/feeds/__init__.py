"""Feed adapters (async I/O at the edge) and their pure parsers; see ``events`` for the output."""
