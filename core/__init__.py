"""Neutral modules shared by every layer (no torch, no Flower, no FastAPI, no SQLAlchemy).

Anything here may be imported by compression/, strategies/, client/, api/ and server/;
it imports nothing of the project.
"""
