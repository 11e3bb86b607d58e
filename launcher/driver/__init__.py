"""The driver layer: what runs beside the workers on the machine that launched the run."""
