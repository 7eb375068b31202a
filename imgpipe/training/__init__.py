"""Training: the shared model code, the ResNet50V2 and AutoKeras trainers, evaluation, reports, tracking."""
