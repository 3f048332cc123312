"""vvireid indexer: tracklet manifests, gallery encoding and the FAISS gallery index."""
