"""The image pipeline's library: ingest (sources, fetching, validation), images (the shared
preprocessing), records (TFRecords), training, export (ONNX) and the serving bundle's contract.

Importing it lowers TensorFlow's start-up log before anything imports TensorFlow (``imgpipe.logs``).
"""

from imgpipe.logs import quiet_tensorflow

quiet_tensorflow()
