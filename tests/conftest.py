"""Shared pytest fixtures for the ckpt_callbacks test suite.

Real S3-compatible servers (moto, SeaweedFS) on 127.0.0.1 and a fresh bucket per test come from
:mod:`servers`; see its docstring.
"""

from servers import (  # noqa: F401 -- fixtures, registered by being imported here
    moto_bucket,
    moto_server,
    s3_bucket,
    s3_server,
    seaweedfs_bucket,
    seaweedfs_server,
)
