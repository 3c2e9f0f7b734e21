"""The incremental calibrator and the trigger policy that says when to run it."""
