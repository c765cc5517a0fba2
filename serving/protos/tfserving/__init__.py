"""TF Serving's protocol messages and services, generated without TensorFlow.

See :mod:`modelloop.serving.protos.tfserving_generate`.
"""
