"""Pure model code: encoders and their weights, the alignment and fusion, cf vectors, the top-k kernel and
its blocks, the evaluation protocol. Nothing in this package imports Beam."""
