"""sdrt.export: diffusers checkpoint -> validated ONNX folder. Build time only; needs the `export` extra."""
