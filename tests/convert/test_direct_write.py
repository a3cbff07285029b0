"""The O_DIRECT staging stream writes exactly the bytes a plain pwrite would, at any offsets and sizes."""

import os
import random

import pytest

from convert.direct_write import ALIGN, DirectStream, open_direct


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "f.bin"
    size = 10 * ALIGN + 123
    head = bytes(range(256)) * 2  # bytes already in the file (a header) before the stream starts
    with open(path, "wb") as f:
        f.write(head + bytes(size - len(head)))
    fd = os.open(path, os.O_RDWR)
    direct = open_direct(path)
    if direct is None:
        os.close(fd)
        pytest.skip("no O_DIRECT on this filesystem")
    yield path, fd, direct, bytearray(head + bytes(size - len(head)))
    os.close(direct)
    os.close(fd)


@pytest.mark.parametrize("seed", range(4))
def test_runs_of_bytes_land_as_with_pwrite(target, seed):
    path, fd, direct, expect = target
    rnd = random.Random(seed)
    stream = DirectStream(fd, direct, buffer_bytes=2 * ALIGN)  # small buffers: many hand-offs and tails
    pos = 512
    while pos < len(expect):
        if rnd.random() < 0.2:  # a gap (padding, or a tensor written later): a new run begins
            pos = min(len(expect) - 1, pos + rnd.randrange(1, 3 * ALIGN))
        if stream.end != pos:
            stream.begin(pos)
        n = min(len(expect) - pos, rnd.choice([1, 7, ALIGN - 1, ALIGN, 3 * ALIGN + 5]))
        data = bytes(rnd.randrange(256) for _ in range(n))
        stream.append(memoryview(data))
        expect[pos:pos + n] = data
        pos += n
        if rnd.random() < 0.1:
            stream.flush()  # a unit recorded: bytes in the file, the stream goes on
    stream.close()
    assert path.read_bytes() == bytes(expect)
