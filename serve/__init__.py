"""Prediction service on ONNX Runtime: the bundle, the FastAPI app, its batcher and input guards,
predict_folder. No TensorFlow import here."""
