"""Tests run Keras on its torch backend; rank-side helpers live beside the tests."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
