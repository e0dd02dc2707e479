"""What is run: model families (Keras and keras-hub) and the scenarios measured on launched ranks."""
