"""Prepared data: raw files encoded once into NumPy shards + a manifest (``data prepare``), read back by training.

``manifest.py`` the folder's layout and file entries; ``prepare.py`` writes a folder (``prepare``);
``shards.py`` opens one (``Prepared``). Each imports only the modules below it: manifest ← shards, and
manifest ← prepare.
"""
