"""The training layer: what runs inside every rank."""
