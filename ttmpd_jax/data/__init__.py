"""Data: Fashion-MNIST IDX reader, TFDS sources, our own corruptions, the input pipeline."""
