"""distill: the DeiT pipeline (teacher, distilled student, FixRes fine-tune, transfer) in chained stages."""

__version__ = "0.1.0"
