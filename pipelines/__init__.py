"""Job definitions: each stage module reads like a sentence of transforms and runs as ``mmfuse <stage>``."""
