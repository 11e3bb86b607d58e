"""After and around a run: its history read back, plots, the status of every run under a
directory, the driver's liveness record, and a chat with the exported model."""
