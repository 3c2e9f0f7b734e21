"""Recordings: the recorder, readers (our format, cryptofeed, Tardis), and a replay feed."""
