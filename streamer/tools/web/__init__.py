"""The live page, a client of the bus: ``streamer web`` (``server``, ``state``, ``timeline``)
and the page served from inside the daemon (``publisher``). The page itself (HTML, JS, CSS)
is package data under ``static/``; Plotly.js comes from the installed ``plotly`` package."""
