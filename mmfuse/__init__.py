"""mmfuse: multimodal recommendations on Apache Beam.

The code lives in the repository's top-level folders (``pipelines``, ``transforms``, ``models``,
``runners``); setup.py installs them under this one name, as ``mmfuse.pipelines`` and so on.
"""
__version__ = "0.1.0"
