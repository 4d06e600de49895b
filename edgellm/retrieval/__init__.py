"""Embeddings, the local document index and retrieval: embed.py runs embedding bundles, index.py
keeps chunks and vectors in one SQLite file, chunking.py splits documents by their structure."""
