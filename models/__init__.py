"""Pure model code: encoders and their weights. Nothing in this package imports Beam."""
