"""Prediction service on ONNX Runtime (planned: see the export-and-serving issue). No TensorFlow import here."""
