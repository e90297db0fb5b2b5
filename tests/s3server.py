"""An S3-compatible server for tests: moto's server mode, on 127.0.0.1 only, read and written through fsspec/s3fs
exactly as a real bucket would be.

A test module makes its own fixture: `s3 = s3_fixture("my-bucket")` (module-scoped: one server per module).
"""

import pytest


def s3_fixture(bucket: str):
    """A module-scoped fixture yielding the server's s3fs filesystem with `bucket` made; AWS_* point botocore
    (hence s3fs, in this process and any it starts) at the server while the module runs."""

    @pytest.fixture(scope="module")
    def s3():
        import logging

        moto_server = pytest.importorskip("moto.server")
        s3fs = pytest.importorskip("s3fs")
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            with pytest.MonkeyPatch.context() as mp:
                for key, value in {
                    "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                }.items():
                    mp.setenv(key, value)
                s3fs.S3FileSystem.clear_instance_cache()
                fs = s3fs.S3FileSystem()
                fs.makedirs(bucket, exist_ok=True)  # moto's state outlives a server: another module's may be there
                yield fs
                s3fs.S3FileSystem.clear_instance_cache()
        finally:
            server.stop()

    return s3
