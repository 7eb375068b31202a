"""The per-request Keras service the seeds built, for comparison: one ``model.predict`` per image.

    python -m bench.keras_server --model model.keras --port 8001

Same preprocessing (``imgpipe.images``), same multipart ``image`` field as the real service, no
batching and TensorFlow in the request path.
"""

from __future__ import annotations

import argparse

import numpy as np
import uvicorn
from fastapi import FastAPI, UploadFile

from imgpipe.images import preprocess


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import keras

    model = keras.saving.load_model(args.model, compile=False)
    size = model.input_shape[1]
    app = FastAPI()

    @app.post("/predict")
    def predict(image: UploadFile) -> dict:  # a plain def: FastAPI runs it in its thread pool
        pixels, _ = preprocess(image.file.read(), size)
        probabilities = model.predict(pixels[None].astype(np.float32), verbose=0)[0]
        return {"label": int(np.argmax(probabilities)), "confidence": float(np.max(probabilities))}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
