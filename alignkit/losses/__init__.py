"""Pure tensor functions: tensors in, per-example (or per-token) unreduced values out."""
