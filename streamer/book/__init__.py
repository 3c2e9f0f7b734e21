"""The option-chain book: live rows per instrument (``book``), the immutable arrays the
calibrator reads (``snapshot``), and the fused ticker write (``fastpath``)."""
