"""The Fashion-MNIST domain shared by the trainers and the benchmarks: captions and the metrics classifier."""
