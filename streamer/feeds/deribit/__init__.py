"""Deribit: the pure protocol and parser, the websocket connection, and a loopback fake server."""
