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


def pytest_addoption(parser):
    """Options of the reliability suite (tests/reliability), registered here at the root."""
    group = parser.getgroup("reliability", "crash, fault and hostile-input trials (tests/reliability)")
    group.addoption(
        "--trials", type=int, default=None, metavar="N",
        help="kill trials in total (default: the CI sample, at least 30); fault-proxy runs scale with it "
             "(N // 5), and crash points are enumerated in full",
    )
    group.addoption(
        "--reliability-stats", default=None, metavar="PATH",
        help="write the reliability figures (per scenario) to this JSON file",
    )
