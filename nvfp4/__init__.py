"""NVFP4 for Gemma 4: the format (codec), a quantizer, a checkpoint doctor (python -m nvfp4.quantize / nvfp4.doctor)."""
