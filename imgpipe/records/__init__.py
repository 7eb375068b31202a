"""TFRecords: writing the packed, split shards (the pack stage) and reading them back with tf.data."""
