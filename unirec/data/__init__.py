"""MovieLens-100k preparation: the event stream for offline training and Kafka replay."""
