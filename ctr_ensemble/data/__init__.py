"""Data: raw click logs in → model inputs out. Imports nothing of ``ctr_ensemble`` but ``errors`` and ``files`` (atomic writes).

``readers/`` reads every input format into ``RawBatch``es (the registry: ``open_reader``); ``spec.py`` the
feature spec and the model inputs it defines; ``fit.py`` fits a spec on training data; ``encode.py`` applies
it (``Encoder``, ``encode_file`` → ``Arrays``); ``prepared/`` encodes large inputs once into shards and reads
them back (``data prepare``, ``Prepared``); ``synth.py`` and ``movielens.py`` build data sets.
"""
