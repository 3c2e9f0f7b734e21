"""The daemon: the pure pipeline, the asyncio service around it, replay, metrics,
sd_notify, logs."""
