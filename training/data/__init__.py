"""Training-side data: the synthetic generator, samplers, clip datasets and augmentation.

The dataset readers themselves live one layer down, in :mod:`vvireid.indexer.sources`, because
the index builder reads them too. Torch-dependent parts are imported from their own submodules so
that reading lists stays light.
"""
