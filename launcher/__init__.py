"""ftlaunch: one YAML recipe to a DeepSpeed ZeRO fine-tuning job on Ray Train."""

__version__ = "0.1.0"
