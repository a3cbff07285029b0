"""file_sha256 hashes from a mapping in chunks: the result must be hashlib's over the whole file at every size."""

import hashlib
import threading

import pytest

from convert.hashing import file_sha256


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 3 * 4096 + 7])
def test_file_sha256_is_hashlib_of_the_whole_file(tmp_path, size):
    data = bytes(i * 7 % 251 for i in range(size))
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert file_sha256(p, chunk=4096) == hashlib.sha256(data).hexdigest()


def test_file_sha256_stops_when_asked(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 10000)
    stop = threading.Event()
    stop.set()
    assert file_sha256(p, chunk=4096, stop=stop) is None
