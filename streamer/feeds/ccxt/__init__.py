"""Other venues through ccxt: the pure mapping, the connection, and a fake exchange."""
