"""Pseudonymous user ids: a keyed HMAC-SHA256 of each ``user_id``, applied as interactions are read, so no
raw user id reaches an output (``users``, ``recommendations``, ``dead_letter``).

The key comes from an environment variable or a secret file, never from the command line, and the same key
gives the same pseudonym every night, so nights still join. To find a user's rows, compute the pseudonym with
the key: ``hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()`` (``pseudonym`` below).
"""
from __future__ import annotations

import hashlib
import hmac
import os

from apache_beam.io.filesystems import FileSystems

from mmfuse.transforms.contract import ContractError

KEY_ENV = "MMFUSE_PSEUDONYM_KEY"


def pseudonym(key: bytes, user_id: str) -> str:
    return hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()


def load_key(key_file: str) -> bytes:
    """The key: the file's bytes (local or gs://, surrounding whitespace dropped), else the environment
    variable MMFUSE_PSEUDONYM_KEY; at least 16 bytes."""
    if key_file:
        try:
            with FileSystems.open(key_file) as f:
                key = f.read().strip()
        except OSError as e:
            raise ContractError(f"--pseudonym_key_file={key_file}: cannot be read ({type(e).__name__})") from None
    else:
        key = os.environ.get(KEY_ENV, "").strip().encode()
    if len(key) < 16:
        raise ContractError(f"--pseudonymize_user_ids needs a key of at least 16 bytes in {KEY_ENV} or in "
                            "--pseudonym_key_file")
    return key
