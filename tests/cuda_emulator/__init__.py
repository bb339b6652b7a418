"""The CPU grid emulator of the CUDA kernel's device code (test-only): cuda_emulator.h, runner.cpp, build.py, emulated.py."""
