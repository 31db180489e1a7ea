"""stillhouse: distil a teacher language model into a small open student, and audit models for distillation."""

__version__ = "0.1.0"
