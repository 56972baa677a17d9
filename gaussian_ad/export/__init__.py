"""Exports: a fitted detector as one ONNX graph (pre-processing, backbone, scores), and
scoring with it in onnxruntime."""
