"""The frame built once for every viewer is exactly what websockets itself would send."""

import pytest
from websockets.frames import Frame, Opcode

from giftstream.server.realtime.fanout import text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_text_frame_matches_websockets(size: int) -> None:
    payload = b"x" * size
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert text_frame(payload) == expected
