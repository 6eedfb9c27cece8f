"""Model artifact folders between local disk and the run's storage (local or gs://): Keras and tf.Transform
save and load local paths, the run keeps its artifacts wherever ``--output`` is."""
from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from typing import Iterator, Sequence

from apache_beam.io.filesystems import FileSystems


def publish(local: str, folder: str) -> str:
    """Copy a local folder, recursively, to ``folder``; returns ``folder``."""
    for parent, _, names in sorted(os.walk(local)):
        for name in sorted(names):
            source = os.path.join(parent, name)
            with open(source, "rb") as src, \
                    FileSystems.create(posixpath.join(folder, os.path.relpath(source, local))) as dst:
                shutil.copyfileobj(src, dst)
    return folder


@contextlib.contextmanager
def fetched(folder: str, names: Sequence[str] | None = None) -> Iterator[str]:
    """A local copy of ``folder``, or of its top-level files ``names`` only, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="mmfuse-artifact-") as local:
        for m in FileSystems.match([posixpath.join(folder, "**")])[0].metadata_list:
            if names is not None and posixpath.relpath(m.path, folder) not in names:
                continue
            target = posixpath.join(local, posixpath.relpath(m.path, folder))
            os.makedirs(posixpath.dirname(target), exist_ok=True)
            with FileSystems.open(m.path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        yield local


def copy(source: str, folder: str) -> str:
    """Copy the artifact folder ``source`` to ``folder`` (either may be remote); returns ``folder``."""
    with fetched(source) as local:
        return publish(local, folder)
