"""Frontends lower models to the sparsec IR: ``onnx`` (files, protos) and ``torch``
(torch.export capture)."""
