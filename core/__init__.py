"""Neutral modules shared by every layer (no torch, no Flower, no FastAPI, no SQLAlchemy).

Anything here may be imported by every other package (compression/, tasks/, strategies/,
client/, api/, server/, ...); it imports nothing of the project (tests/test_layers.py).
"""
