"""Integrations with the libraries MoE users already run (HF transformers: ``transformers.py``).

Each integration is a module of its own that imports its library lazily: importing this package
imports none of them.
"""
